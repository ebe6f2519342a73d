"""IFD as published: scored with a briefly pre-experienced reference, not the raw base."""

import random

import numpy as np
import pytest
import ray

from instune.base_model import tokenizer_training_texts
from instune.data.pre_experience import PreExperience, pre_experience, sample_conversations
from instune.data.schema import make_record
from instune.data.score import ReferenceScorer
from instune.default.corpus import DOMAINS
from instune.default.model import ensure_embedded_model

DOMAIN_NAMES = ["arithmetic", "list_ops", "string_edit", "unit_conversion"]


def conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def tasks(count: int, rng: random.Random) -> list[tuple[str, str]]:
    """(instruction, answer) pairs of the embedded corpus, the domains in turn."""
    out = []
    for i in range(count):
        instruction, input_, answer = DOMAINS[DOMAIN_NAMES[i % len(DOMAIN_NAMES)]](rng)
        out.append((instruction + (f"\n\n{input_}" if input_ else ""), answer))
    return out


def auc(high: np.ndarray, low: np.ndarray) -> float:
    """P(a score from `high` exceeds one from `low`), ties counting half: 0.5 is no separation."""
    greater = (high[:, None] > low[None, :]).mean()
    return float(greater + 0.5 * (high[:, None] == low[None, :]).mean())


@pytest.mark.slow
def test_pre_experienced_ifd_separates_hard_from_trivial_items(tmp_path):
    """Trivial items are embedded-corpus tasks as generated: the instruction determines the answer. Hard items
    pair each instruction with the answer of a task from another domain: the instruction does not help (IFD
    about 1, the paper's "hard" end). The measure is the AUC of IFD between the two groups (0.5: no
    separation), and the gap between their mean IFDs. The raw embedded base (random weights) scores both
    groups at about 1; after 4 epochs on 320 sampled records the reference must separate them.
    """
    model_dir = str(ensure_embedded_model(
        tmp_path / "base", tokenizer_training_texts(per_domain=30), vocab_size=400, hidden_size=64, num_layers=2,
        num_heads=2, intermediate_size=128, max_position_embeddings=256, seed=0))
    rng = random.Random(0)
    sample = [conversation(*t) for t in tasks(320, rng)]
    held_out = tasks(80, rng)
    trivial = [conversation(q, a) for q, a in held_out]
    hard = [conversation(held_out[i][0], held_out[(i + 1) % 80][1]) for i in range(80)]  # next is another domain

    def separation(path: str) -> tuple[float, float]:
        scorer = ReferenceScorer(path, path, "ifd", max_length=64, batch_size=64, max_batch_tokens=16384)
        high = np.array([s["ifd"] for s in scorer.scores(hard)])
        low = np.array([s["ifd"] for s in scorer.scores(trivial)])
        return auc(high, low), float(high.mean() - low.mean())

    base_auc, base_gap = separation(model_dir)
    trained = pre_experience(model_dir, model_dir, sample, str(tmp_path / "pre"), 64,
                             PreExperience(size=320, epochs=4, lr=3e-3, batch_size=16, seed=0))
    pre_auc, pre_gap = separation(trained)
    assert abs(base_auc - 0.5) < 0.1 and abs(base_gap) < 0.05  # the raw base: IFD ~ 1 for both groups
    assert pre_auc > base_auc + 0.1 and pre_gap > 0.2, (base_auc, base_gap, pre_auc, pre_gap)


def test_sample_is_the_same_whatever_the_blocks(local_ray):
    records = [make_record(f"s:f.jsonl:line {i}", "s", "d", conversation(f"q{i}", f"a{i}")) for i in range(50)]
    samples = [sample_conversations(ray.data.from_items(records, override_num_blocks=blocks), 12, seed=3)
               for blocks in (1, 5)]
    assert samples[0] == samples[1] and len(samples[0]) == 12
    questions = [messages[0]["content"] for messages in samples[0]]
    assert len(set(questions)) == 12
    assert sample_conversations(ray.data.from_items(records), 12, seed=4) != samples[0]
    assert len(sample_conversations(ray.data.from_items(records), 500, seed=3)) == 50
