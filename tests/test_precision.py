"""CPU bf16: autocast follows fp32 training closely on the real model, and `auto` picks bf16 only where it pays."""

from __future__ import annotations

import pytest
import torch

from models import engine
from models.data import encode_instruction
from models.engine import autocast_dtype, train
from models.loading import load_model_and_tokenizer
from models.tuning import apply_tuning
from perennial.config import OptimConfig, TuningConfig
from perennial.demo_data import demo_tasks, task_records

pytestmark = pytest.mark.slow

# Small on purpose: on a CPU without native bf16 (CI's can be one) autocast emulates bf16 matmuls at ~40 s
# per step of batch 4 x 48 tokens, 22x fp32's time. At batch 2 the fp32 loss falls by a third in 3 steps
# (10.37 -> 7.00).
STEPS, BATCH_SIZE, MAX_LENGTH = 3, 2, 48
# bf16 keeps 8 mantissa bits (relative rounding ~0.4%); over a few steps the rounding of activations
# moves each step's loss by well under 5% of itself on this model (measured at this size: at most 1.3%,
# step 2: 7.853 vs 7.953; at batch 4 for 6 steps: at most 2.0%).
LOSS_TOLERANCE = 0.05


def _losses(folder, precision: str) -> list[float]:
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(folder)
    model = apply_tuning(model, TuningConfig(method="attn-proj"))
    task = demo_tasks(1234)["zorbish"]
    records = [r for r in task_records(task, 16, 4, 1234) if r["split"] == "train"]
    examples = [encode_instruction(tokenizer, r["prompt"], r["response"], MAX_LENGTH) for r in records]
    optim = OptimConfig(lr=3e-4, max_steps=STEPS, batch_size=BATCH_SIZE, warmup_steps=1, max_length=MAX_LENGTH)
    result = train(model, examples, optim, seed=0, pad_token_id=tokenizer.pad_token_id, precision=precision)
    return result.losses


def test_bf16_training_follows_the_fp32_loss_on_the_real_model(smollm2_dir):
    fp32, bf16 = _losses(smollm2_dir, "fp32"), _losses(smollm2_dir, "bf16")
    assert fp32[-1] < fp32[0] * 0.8, f"the run must learn for the comparison to mean something: {fp32}"
    for step, (a, b) in enumerate(zip(fp32, bf16), start=1):
        assert abs(a - b) <= LOSS_TOLERANCE * a, f"step {step}: fp32 {a:.4f} vs bf16 {b:.4f} ({fp32} vs {bf16})"
    assert fp32 != bf16, "bf16 must actually change the arithmetic (autocast was not applied)"


def test_auto_precision_is_bf16_on_cuda_and_on_cpus_with_native_bf16(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("fp32", cuda) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and autocast_dtype("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    assert autocast_dtype("auto", cpu) is None  # emulated bf16 is slower than fp32
    with pytest.raises(ValueError, match="precision=fp32"):
        autocast_dtype("bf16", torch.device("mps"))
