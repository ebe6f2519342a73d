"""Best-fit packing: rows of exactly seq_len, examples intact and attributed, and the same loss as unpacked."""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from instune.data.pack import Packer, pack, pad_one
from instune.data.tokenize import IGNORE_INDEX
from instune.train.loop import count_targets, token_loss_sum

SEQ_LEN = 32
PAD = 0


def random_examples(count: int, seed: int = 0, vocab: int = 50) -> list[tuple[list[int], list[int], str]]:
    """(input_ids, labels, source) with a prompt part (ignored) and an answer part (labelled)."""
    rng = random.Random(seed)
    examples = []
    for k in range(count):
        prompt, answer = rng.randint(1, 10), rng.randint(1, 12)
        ids = [rng.randint(1, vocab - 1) for _ in range(prompt + answer)]
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        examples.append((ids, labels, f"source{k % 3}"))
    return examples


def segments(row: dict) -> list[tuple[list[int], list[int]]]:
    """The row cut where position ids restart, as (input_ids, labels) pieces."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, starts[1:])]


def test_rows_have_seq_len_and_hold_every_example_once():
    examples = random_examples(60)
    rows = pack(examples, SEQ_LEN, PAD)
    assert all(len(r[k]) == SEQ_LEN for r in rows for k in ("input_ids", "labels", "position_ids"))
    found = []
    for row in rows:
        pieces = segments(row)
        real = pieces[: row["num_examples"]]
        # What follows the examples is one padding segment with no labels.
        for ids, labels in pieces[row["num_examples"]:]:
            assert set(ids) == {PAD} and set(labels) == {IGNORE_INDEX}
        assert row["num_tokens"] == sum(len(ids) for ids, _ in real)
        assert row["num_target_tokens"] == sum(l != IGNORE_INDEX for _, labels in real for l in labels)
        found += real
    assert sorted(map(repr, found)) == sorted(repr((ids, labels)) for ids, labels, _ in examples)


def test_sources_follow_their_examples_into_rows():
    examples = random_examples(40, seed=1)
    source_of = {repr(ids): source for ids, _, source in examples}
    rows = pack(examples, SEQ_LEN, PAD)
    for row in rows:
        assert len(row["sources"]) == row["num_examples"]
        assert row["sources"] == [source_of[repr(ids)] for ids, _ in segments(row)[: row["num_examples"]]]
    counts = {}
    for row in rows:
        for s in row["sources"]:
            counts[s] = counts.get(s, 0) + 1
    assert counts == {"source0": 14, "source1": 13, "source2": 13}


def test_best_fit_fills_the_tightest_bin():
    packer = Packer(seq_len=10, pad_id=PAD)
    assert packer.add([1] * 6, [1] * 6) == []
    assert packer.add([2] * 5, [2] * 5) == []  # does not fit beside the 6: a second bin
    closed = packer.add([3] * 4, [3] * 4)  # fits both; best fit is the 6, which it fills exactly
    assert len(closed) == 1 and closed[0]["input_ids"] == [1] * 6 + [3] * 4 and closed[0]["num_examples"] == 2
    [rest] = packer.flush()
    assert rest["input_ids"] == [2] * 5 + [PAD] * 5 and rest["num_tokens"] == 5


def test_too_many_open_bins_close_the_fullest():
    packer = Packer(seq_len=10, pad_id=PAD, max_open=2)
    packer.add([1] * 7, [1] * 7)
    packer.add([2] * 8, [2] * 8)
    closed = packer.add([3] * 9, [3] * 9)
    assert [r["input_ids"][:9] for r in closed] == [[3] * 9]  # the fullest open bin is the new one


def test_pad_one_keeps_one_example_per_row():
    row = pad_one([5, 6, 7], [IGNORE_INDEX, 6, 7], 6, PAD, "s")
    assert row == {"input_ids": [5, 6, 7, PAD, PAD, PAD], "labels": [IGNORE_INDEX, 6, 7] + [IGNORE_INDEX] * 3,
                   "position_ids": [0, 1, 2, 0, 1, 2], "num_examples": 1, "num_target_tokens": 2, "num_tokens": 3,
                   "sources": ["s"]}


def test_examples_longer_than_seq_len_are_refused():
    with pytest.raises(AssertionError, match="truncated"):
        pack([([1] * 40, [1] * 40)], SEQ_LEN, PAD)


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().eval()


def as_batch(rows: list[dict]) -> dict:
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in ("input_ids", "labels", "position_ids")}


def test_packed_loss_equals_token_weighted_unpacked_loss():
    """Restarting position ids isolate the examples: a packed batch has exactly the loss of its examples."""
    model = tiny_llama()
    examples = random_examples(24, seed=2)
    rows = pack(examples, SEQ_LEN, PAD)
    assert any(r["num_examples"] >= 3 for r in rows)  # the test must actually pack
    with torch.no_grad():
        packed_sum = token_loss_sum(model, as_batch(rows))
        packed_targets = count_targets(as_batch(rows))
        unpacked = [as_batch([{"input_ids": ids, "labels": labels, "position_ids": list(range(len(ids)))}])
                    for ids, labels, _ in examples]
        unpacked_sum = sum(token_loss_sum(model, b) for b in unpacked)
        unpacked_targets = sum(count_targets(b) for b in unpacked)
    assert packed_targets == unpacked_targets
    assert torch.allclose(packed_sum / packed_targets, unpacked_sum / unpacked_targets, atol=1e-5, rtol=0)
    assert torch.allclose(packed_sum, unpacked_sum, atol=1e-4 * unpacked_targets, rtol=0)
