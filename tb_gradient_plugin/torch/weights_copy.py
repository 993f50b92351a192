"""The weights copy that update norms through a copy take on a logged step (``update_norms="copy"``, and every
optimizer whose update its state does not give).

On the CPU a fresh copy of a large tensor costs more in page faults than in copying: the C allocator serves tensors of
megabytes from mappings it hands back to the kernel when they are freed, so each logged step faults them in anew, 4 KiB
at a time (8,000 faults for a 32 MiB model, twice the time of the copy itself). Here the copies of the tensors of at
least one huge page (2 MiB) share one anonymous mapping that asks for transparent huge pages, which takes a few dozen
faults. The mapping is unmapped as soon as the last copy is dropped, so the copy still exists only during the step and
takes no more memory than ``clone``. Smaller tensors are cloned: the allocator recycles their memory from step to step
without faults, often while it is still in cache, which no fresh mapping can beat. So are tensors on accelerators
(their caching allocators do not fault) and everything on systems without ``MADV_HUGEPAGE``.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import torch

__all__ = ["copies"]

HUGE_PAGE = 2 << 20
_HUGE_PAGES = hasattr(mmap, "MADV_HUGEPAGE")


def copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A copy of each tensor (same shape, dtype and device; contiguous), taken now."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    large: dict[torch.dtype, list[int]] = {}
    if _HUGE_PAGES:
        for i, t in enumerate(tensors):
            if t.device.type == "cpu" and t.numel() * t.element_size() >= HUGE_PAGE:
                large.setdefault(t.dtype, []).append(i)
    for idx in large.values():
        try:
            mapped = _mapped([tensors[i] for i in idx])
        except OSError:  # no mapping or no huge pages to be had (memory limits, a kernel without them): clone
            continue
        for i, c in zip(idx, mapped, strict=True):
            out[i] = c
    return [t.clone() if c is None else c for c, t in zip(out, tensors, strict=True)]


def _mapped(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of CPU tensors of one dtype in one mapping backed by huge pages where the kernel grants them."""
    count = sum(t.numel() for t in tensors)
    nbytes = count * tensors[0].element_size()
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # Huge pages need a 2 MiB aligned range: start the copies at the first such address in the mapping, and leave
    # the tail that fills no whole huge page in small pages (no partly used huge page beyond the copy's size).
    start = -torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE
    region.madvise(mmap.MADV_HUGEPAGE, start, nbytes - nbytes % HUGE_PAGE)
    # The tensors hold the mapping (frombuffer keeps a reference): it is unmapped when the last copy is dropped.
    flat = torch.frombuffer(region, dtype=tensors[0].dtype, count=count, offset=start)
    out = []
    pos = 0
    for t in tensors:
        n = t.numel()
        out.append(flat[pos:pos + n].view(t.shape).copy_(t))
        pos += n
    return out
