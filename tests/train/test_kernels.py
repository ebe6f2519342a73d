"""model.kernels: which kernels a worker takes, and the one line it prints when `auto` falls back."""

from __future__ import annotations

import pytest

from instune.train.chunked_loss import chunked_linear_cross_entropy_sum, liger_linear_cross_entropy_sum
from instune.train.kernels import choose_kernels, loss_sum_for


@pytest.mark.parametrize("requested,device,installed,liger,note", [
    ("none", "cuda", True, False, None),
    ("liger", "cuda", True, True, None),
    ("auto", "cuda", True, True, None),
    ("auto", "cpu", True, False, "on cpu (Liger's kernels are Triton, CUDA only)"),
    ("auto", "cuda", False, False, "liger-kernel is not installed (pip install 'instune[gpu]')"),
])
def test_auto_takes_liger_only_on_cuda_with_the_package(requested, device, installed, liger, note):
    choice = choose_kernels(requested, device, installed)
    assert choice.use_liger is liger
    if note is None:
        assert choice.fallback_note is None
    else:
        assert choice.fallback_note.startswith("model.kernels: auto uses PyTorch's kernels and the chunked loss")
        assert choice.fallback_note.endswith(note) and "\n" not in choice.fallback_note
    expected_loss = liger_linear_cross_entropy_sum if liger else chunked_linear_cross_entropy_sum
    assert loss_sum_for(choice) is expected_loss


def test_a_worker_without_cuda_given_liger_stops_on_the_invariant():
    # checks.check_attention_and_kernels refuses liger without a GPU before Ray starts (tests/train/test_checks.py);
    # a worker that still gets there (a node without CUDA) stops on the invariant instead of training without it.
    with pytest.raises(AssertionError, match="needs CUDA"):
        choose_kernels("liger", "cpu", True)
    with pytest.raises(AssertionError, match="liger-kernel"):
        choose_kernels("liger", "cuda", False)
