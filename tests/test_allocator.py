"""models.allocator: the training loop reuses freed heap memory instead of faulting it in every step."""

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


def test_freed_memory_is_reused_inside_and_returned_outside():
    outside = _faults_per_buffer()
    if outside < 1000:
        pytest.skip(f"fresh mappings cost only {outside:.0f} faults here (huge pages): nothing to save")
    with freed_memory_kept() as applied:
        assert applied
        inside = _faults_per_buffer()
    after = _faults_per_buffer()
    pages = BUFFER_BYTES / resource.getpagesize()
    # glibc's default: a fresh mmap per buffer, so about one fault per page; kept: the same pages again
    assert outside > 0.5 * pages
    assert inside < 0.01 * pages
    assert after > 0.5 * pages  # the defaults are back once the loop is over


def test_nested_use_restores_only_when_the_outermost_block_ends():
    with freed_memory_kept():
        with freed_memory_kept():
            pass
        assert allocator._depth == 1
        still_kept = _faults_per_buffer()
    assert allocator._depth == 0
    assert still_kept < 0.01 * BUFFER_BYTES / resource.getpagesize()


def test_the_engine_trains_inside_it(monkeypatch):
    from models import engine

    depths = []
    monkeypatch.setattr(engine, "_distributed", lambda: (depths.append(allocator._depth), (0, 1))[1])
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no training examples"):
        engine.train(model, [], None, seed=0, pad_token_id=0)
    assert allocator._depth == 0  # restored even when the loop raises
