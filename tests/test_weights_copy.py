"""The weights copy of the update norms' copy path: equal to a clone, independent of the weights, and gone (memory
included) once dropped."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tb_gradient_plugin.torch import weights_copy


def _rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _weights() -> list[torch.Tensor]:
    """Shapes of a real model's parameters, one of them a non-contiguous view (a transposed weight)."""
    torch.manual_seed(0)
    return [torch.randn(1024, 1024), torch.randn(1024), torch.randn(512, 2048).t(), torch.randn(3, 5, 7),
            torch.randn(0)]


def test_copies_equal_the_weights_and_do_not_follow_them() -> None:
    weights = _weights()
    snap = weights_copy.copies(weights)
    assert [s.shape for s in snap] == [w.shape for w in weights]
    assert all(s.dtype == w.dtype and s.is_contiguous() for s, w in zip(snap, weights, strict=True))
    for s, w in zip(snap, weights, strict=True):
        torch.testing.assert_close(s, w, rtol=0, atol=0)
    before = [w.clone() for w in weights]
    for w in weights:
        w.mul_(2.0)
    for s, b in zip(snap, before, strict=True):
        torch.testing.assert_close(s, b, rtol=0, atol=0)
    if weights_copy._HUGE_PAGES:  # the two large ones share one block, starting on a huge-page boundary
        assert snap[0].untyped_storage().data_ptr() == snap[2].untyped_storage().data_ptr()
        assert snap[0].data_ptr() % weights_copy.HUGE_PAGE == 0
    # the copies of a group do not overlap each other
    snap[0].fill_(7.0)
    torch.testing.assert_close(snap[1], before[1], rtol=0, atol=0)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set size from /proc")
def test_the_copy_is_unmapped_when_its_last_tensor_is_dropped() -> None:
    weights = [torch.randn(2048, 2048) for _ in range(4)]  # 64 MiB
    size = sum(w.numel() * w.element_size() for w in weights)
    base = _rss()
    snap = weights_copy.copies(weights)
    assert _rss() - base > 0.9 * size
    keep = snap[2]
    del snap
    assert _rss() - base > 0.9 * size  # one copy still holds the block
    del keep
    assert _rss() - base < 0.1 * size


def test_small_tensors_are_cloned_and_each_dtype_gets_its_own_mapping() -> None:
    small = [torch.randn(100), torch.randn(256, 256)]  # 256 KiB: under one huge page
    for s, w in zip(weights_copy.copies(small), small, strict=True):
        assert s.untyped_storage().nbytes() == w.numel() * w.element_size()
        torch.testing.assert_close(s, w, rtol=0, atol=0)
    mixed = [torch.randn(1024, 1024), torch.randn(1024, 1024, dtype=torch.float64), torch.randn(1024, 1024)]
    snap = weights_copy.copies(mixed)
    for s, w in zip(snap, mixed, strict=True):
        assert s.dtype == w.dtype
        torch.testing.assert_close(s, w, rtol=0, atol=0)
    if weights_copy._HUGE_PAGES:
        blocks = [s.untyped_storage().data_ptr() for s in snap]
        assert blocks[0] == blocks[2] != blocks[1]
    assert weights_copy.copies([]) == []


def test_a_refused_mapping_falls_back_to_clones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel refuses the mapping or its huge pages (memory limits, no THP), the copy is still taken."""
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(weights_copy.mmap, "mmap", refuse)
    weights = _weights()
    snap = weights_copy.copies(weights)
    for s, w in zip(snap, weights, strict=True):
        assert s.untyped_storage().nbytes() == w.numel() * w.element_size()
        torch.testing.assert_close(s, w, rtol=0, atol=0)
