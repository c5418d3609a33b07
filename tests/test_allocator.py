"""models.allocator: the training loop reuses freed heap memory instead of faulting it in every step."""

import ctypes
import resource

import pytest
import torch

from models import allocator
from models.allocator import freed_memory_kept

BUFFER_BYTES = 96 * 2**20  # above glibc's largest mmap threshold (32 MB), like SmolLM2's logits


def _faults_per_buffer(rounds: int = 6, warmup: int = 12) -> float:
    """Minor page faults per allocate-touch-free of one large buffer, after warm-up rounds (a kept
    heap first grows to fit the buffer, its alignment slack included, as a loop's first steps do)."""
    for _ in range(warmup):
        torch.ones(BUFFER_BYTES, dtype=torch.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        buffer = torch.ones(BUFFER_BYTES, dtype=torch.uint8)  # touches every page
        del buffer
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds


pytestmark = pytest.mark.skipif(allocator._libc() is None, reason="the C library has no mallopt (not glibc)")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2() -> _Mallinfo2:
    mallinfo2 = allocator._libc().mallinfo2
    mallinfo2.restype = _Mallinfo2
    return mallinfo2()


def _mmapped_bytes() -> int:
    """glibc's bytes in mmapped blocks (mallinfo2().hblkhd)."""
    return _mallinfo2().hblkhd


def _new_large_block_is_mmapped() -> bool:
    """Whether glibc serves a new block with its own mapping. The block is larger than all the free heap
    memory together (mallinfo2().fordblks), so no free chunk can hold it and glibc must ask the OS (mmap,
    or grow the heap). Free heap counts because glibc serves a large request from a free chunk before it
    maps: earlier checks' blocks, freed inside `freed_memory_kept`, and a model trained inside it earlier
    in the same process (an xdist worker) leave them. It is never touched: it costs address space, not
    memory."""
    size = _mallinfo2().fordblks + 512 * 2**20
    before = _mmapped_bytes()
    block = torch.empty(size, dtype=torch.uint8)
    mapped = _mmapped_bytes() - before >= size
    del block
    return mapped


def test_inside_large_blocks_come_from_the_heap_and_their_pages_are_reused():
    assert _new_large_block_is_mmapped()  # glibc's default: a fresh mapping, unmapped on free
    with freed_memory_kept() as applied:
        assert applied
        assert not _new_large_block_is_mmapped()
        faults = _faults_per_buffer()
    # kept: the same pages again, where a fresh mapping would fault about once per page
    assert faults < 0.01 * BUFFER_BYTES / resource.getpagesize()
    assert _new_large_block_is_mmapped()  # the defaults are back once the loop is over


def test_nested_use_restores_only_when_the_outermost_block_ends():
    with freed_memory_kept():
        with freed_memory_kept():
            pass
        assert allocator._depth == 1
        assert not _new_large_block_is_mmapped()  # the inner exit left the setting on
    assert allocator._depth == 0
    assert _new_large_block_is_mmapped()


def test_the_engine_trains_inside_it(monkeypatch):
    from models import engine
    from perennial.config import OptimConfig

    depths = []
    monkeypatch.setattr(engine, "_distributed", lambda: (depths.append(allocator._depth), (0, 1))[1])
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no training examples"):
        engine.train(model, [], OptimConfig(), seed=0, pad_token_id=0)
    assert allocator._depth == 0  # restored even when the loop raises
