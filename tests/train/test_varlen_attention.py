"""Varlen attention on packed rows: example boundaries from position ids, and the model's logits through
the varlen path equal SDPA's with its block-diagonal mask. PyTorch's varlen kernel is CUDA-only, so on the
CPU a per-example SDPA stands in for it; the GPU check (bench/train_gpu.py) runs the kernel itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from instune.train import varlen_attention
from instune.train.varlen_attention import (VARLEN, cu_seqlens_from_position_ids, packed_attention_inputs,
                                            register_varlen_attention, varlen_available)


def test_boundaries_come_from_position_ids_and_row_starts_including_rows_ending_in_padding():
    # Row 0: examples of 3 and 2 tokens, then 3 padding positions (numbered from 0, as pack.py does);
    # row 1: one example filling the row; row 2: an example continuing from position 5 (a cut example)
    # and one more: a row start is a boundary even where the position is not 0.
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2],
                                 [0, 1, 2, 3, 4, 5, 6, 7],
                                 [5, 6, 7, 0, 1, 2, 3, 4]])
    cu_seqlens = cu_seqlens_from_position_ids(position_ids)
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 3, 5, 8, 16, 19, 24]
    inputs = packed_attention_inputs(position_ids)
    assert inputs["cu_seq_lens_q"].tolist() == inputs["cu_seq_lens_k"].tolist() == cu_seqlens.tolist()
    assert inputs["max_length_q"] == inputs["max_length_k"] == 8  # the row length: a bound for every batch


def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                     enable_gqa=False, **_):
    """torch 2.13's varlen_attn contract, computed with SDPA one example at a time (CPU)."""
    assert window_size == (-1, 0), "the model must ask for causal attention"
    out = torch.empty_like(query)
    bounds = cu_seq_q.tolist()
    assert max(end - start for start, end in zip(bounds[:-1], bounds[1:])) <= max_q, "max_q must bound every example"
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        out[start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                        enable_gqa=enable_gqa).transpose(0, 1)
    return out


@pytest.mark.skipif(not varlen_available(), reason="this PyTorch has no torch.nn.attention.varlen")
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_the_model_through_varlen_attention_gives_sdpas_logits(monkeypatch, kv_heads):
    monkeypatch.setattr(varlen_attention, "varlen_kernel", lambda: reference_varlen)
    register_varlen_attention()
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    varlen = AutoModelForCausalLM.from_config(config, attn_implementation=VARLEN)
    varlen.load_state_dict(sdpa.state_dict())
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]])
    input_ids = torch.randint(0, 64, position_ids.shape)
    expected = sdpa(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    # Boundaries computed once per batch and passed down, or in each layer from the position ids.
    given = varlen(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                   **packed_attention_inputs(position_ids)).logits
    derived = varlen(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(given, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(derived, expected, rtol=1e-5, atol=1e-5)
    # Not a vacuous match: attending across the packed examples changes the logits.
    crossing = sdpa(input_ids=input_ids, use_cache=False).logits
    assert (crossing - expected).abs().max() > 1e-3
