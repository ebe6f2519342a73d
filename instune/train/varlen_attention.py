"""Attention over packed rows without a mask: PyTorch's varlen flash attention, as a transformers attention
implementation.

A packed row holds several examples, each starting again at position 0. SDPA needs a block-diagonal
[rows, 1, T, T] mask for that, which keeps it off its flash kernel; `torch.nn.attention.varlen.varlen_attn`
takes the rows flattened into one sequence of tokens and the boundaries between examples (cu_seqlens) and
runs the flash kernel over each example. The boundaries come from the position ids, once per batch
(`packed_attention_inputs`), and reach every layer through the model's keyword arguments, as transformers'
own flash-attention path takes them; padding at the end of a row starts at position 0 too, so it is an
example of its own that no real token attends to. The kernel is CUDA-only (there is no CPU one).
"""

from __future__ import annotations

import inspect

import torch

# The name models are loaded with (model.attn_implementation: varlen_attention).
VARLEN = "varlen_attention"


def varlen_available() -> bool:
    """Whether this PyTorch has torch.nn.attention.varlen (2.9 and later)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative example boundaries over the flattened rows, int32 [examples + 1].

    An example starts wherever the position id is 0 and at every row's start, so no example spans two rows.

    >>> cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])).tolist()
    [0, 3, 5, 6, 10, 12]
    """
    starts = position_ids == 0
    starts[:, 0] = True
    flat_starts = starts.reshape(-1).nonzero().reshape(-1)
    total = torch.tensor([position_ids.numel()], device=position_ids.device)
    return torch.cat([flat_starts, total]).to(torch.int32)


def packed_attention_inputs(position_ids: torch.Tensor) -> dict:
    """The keyword arguments that carry a batch's example boundaries to every attention layer.

    The longest-example bound is the row length, not the longest example: it is an upper bound the kernel
    sizes its grid by (blocks past an example's end exit at once), it needs no copy from the GPU to read it,
    and it is the same for every batch, so compiled layers are not recompiled for each new longest example.
    """
    cu_seqlens = cu_seqlens_from_position_ids(position_ids)
    bound = position_ids.size(-1)
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": bound, "max_length_k": bound}


def varlen_kernel():
    """PyTorch's varlen_attn (a function, so a test can stand a CPU reference in for the CUDA kernel)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def varlen_parameters() -> set[str]:
    """The keyword parameters of this PyTorch's varlen_attn. Its first release (2.9) asks for causal
    attention with `is_causal=True` and has no `scale`; later ones take `window_size=(-1, 0)` and `scale`,
    and the newest `enable_gqa` for fewer key/value heads than query heads."""
    return set(inspect.signature(varlen_kernel()).parameters)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, cu_seq_lens_q=None, cu_seq_lens_k=None,
                             max_length_q=None, max_length_k=None, position_ids=None, **_):
    """A transformers attention function: query [B, Hq, T, D], key/value [B, Hkv, T, D] ->
    ([B, T, Hq, D], None). Boundaries from the keyword arguments, else from `position_ids`."""
    assert attention_mask is None, "varlen attention takes example boundaries, not a mask"
    assert dropout == 0.0, "varlen attention has no dropout (set the model's attention_dropout to 0)"
    batch, heads_q, length, head_dim = query.shape
    heads_kv = key.size(1)
    if cu_seq_lens_q is None:
        assert position_ids is not None, "varlen attention needs position_ids or cu_seq_lens_q"
        cu_seq_lens_q = cu_seq_lens_k = cu_seqlens_from_position_ids(position_ids.expand(batch, -1))
        max_length_q = max_length_k = length
    parameters = varlen_parameters()
    kwargs = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    if heads_q != heads_kv:
        if "enable_gqa" in parameters:
            kwargs["enable_gqa"] = True
        else:  # no GQA flag: give every query head its key/value head
            key = key.repeat_interleave(heads_q // heads_kv, dim=1)
            value = value.repeat_interleave(heads_q // heads_kv, dim=1)
    if scaling is not None:
        if "scale" in parameters:
            kwargs["scale"] = scaling
        else:  # the kernel scales by 1/sqrt(head_dim)
            query = query * (scaling * head_dim**0.5)
    flat = [t.transpose(1, 2).reshape(batch * length, t.size(1), head_dim) for t in (query, key, value)]
    out = varlen_kernel()(*flat, cu_seq_lens_q, cu_seq_lens_k, int(max_length_q), int(max_length_k), **kwargs)
    return out.reshape(batch, length, heads_q, head_dim), None


def register_varlen_attention() -> None:
    """Make `attn_implementation="varlen_attention"` loadable (idempotent). Registered with no mask function,
    so transformers builds no mask for it."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
