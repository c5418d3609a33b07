"""The training loops the engine benchmarks time side by side, shared by the real-model bench
(bench/engine_real.py) and the tiny-model one (bench/engine_throughput.py).

Every loop has the signature `(model, examples, pad_token_id, steps, clock=stamp) -> stamps`: it
trains `steps` optimizer steps on packed blocks (`examples`, each `{"input_ids": [block]}`) and
returns one `clock()` reading per step, from which `throughput` takes tokens/s at the median step.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from models.allocator import freed_memory_kept
from models.data import collate
from models.engine import precision_context, stream_indices, train
from perennial.config import OptimConfig

Stamp = tuple[float, float]
Loop = Callable[..., list[Stamp]]


@dataclass(frozen=True)
class LoopSettings:
    """What every loop of one benchmark shares: `batch` blocks of `block` tokens a step, AdamW at a constant `lr`."""

    batch: int
    block: int
    lr: float
    seed: int = 0

    def optim_config(self, steps: int) -> OptimConfig:
        # No warm-up in the schedule and a constant rate: the plain loop and Trainer have no schedule either.
        return OptimConfig(lr=self.lr, batch_size=self.batch, max_steps=steps, warmup_steps=0, schedule="constant",
                           max_length=self.block, log_every=10**6)


def stamp() -> Stamp:
    """(wall clock, this process's CPU time), taken after every optimizer step."""
    return time.perf_counter(), time.process_time()


def throughput(stamps: list[Stamp], warmup: int, settings: LoopSettings) -> dict[str, float]:
    """Tokens/s after `warmup` steps, three ways.

    cpu: tokens per CPU-second of the training process at the median step. With one thread this
      is what an idle core would give, and other processes taking the core do not change it.
    wall: tokens per wall-clock second at the median step (a stalled step does not move a median).
    wall_window: tokens over the whole wall-clock window, stalls included.
    """
    after = stamps[warmup - 1 :]
    wall = [b[0] - a[0] for a, b in zip(after, after[1:])]
    cpu = [b[1] - a[1] for a, b in zip(after, after[1:])]
    tokens = settings.batch * settings.block
    return {"cpu": tokens / statistics.median(cpu), "wall": tokens / statistics.median(wall),
            "wall_window": tokens * len(wall) / sum(wall)}


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (Linux >= 4.0), so VmHWM covers what follows only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def status_kib(field: str) -> int:
    """A KiB field of /proc/self/status (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def engine_loop(settings: LoopSettings, precision: str = "fp32") -> Loop:
    """Perennial's engine (`models.engine.train`), its bookkeeping included."""

    def run(model, examples, pad_token_id, steps, clock=stamp):
        stamps = []
        train(model, examples, settings.optim_config(steps), seed=settings.seed, pad_token_id=pad_token_id,
              device=torch.device("cpu"), precision=precision, on_step_end=lambda step, _model: stamps.append(clock()))
        return stamps

    return run


def _batches(examples, steps: int, settings: LoopSettings) -> list[torch.Tensor]:
    """The engine's epoch order (`stream_indices`), pre-stacked: the same batches the engine trains on."""
    data = torch.tensor([example["input_ids"] for example in examples])
    order = torch.tensor(stream_indices(len(examples), settings.seed, 0, steps * settings.batch)).view(steps, settings.batch)
    return [data[order[step]] for step in range(steps)]


def plain_loop(settings: LoopSettings, precision: str = "fp32", compiled: bool = False) -> Loop:
    """The least a loop can do: pre-stacked batches, forward (autocast for bf16), backward, AdamW step."""

    def run(model, examples, pad_token_id, steps, clock=stamp):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
        model.train()
        forward = torch.compile(model) if compiled else model
        stamps = []
        for ids in _batches(examples, steps, settings):
            with precision_context(precision, torch.device("cpu")):
                loss = forward(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stamps.append(clock())
        return stamps

    return run


def plain_bf16_weights_loop(settings: LoopSettings) -> Loop:
    """bf16 weights and activations throughout (no autocast casts), AdamW on fp32 master copies."""

    def run(model, examples, pad_token_id, steps, clock=stamp):
        params = [p for p in model.parameters() if p.requires_grad]
        masters = [p.detach().float().clone().requires_grad_(True) for p in params]
        model.to(torch.bfloat16).train()
        optimizer = torch.optim.AdamW(masters, lr=settings.lr)
        stamps = []
        for ids in _batches(examples, steps, settings):
            model(input_ids=ids, labels=ids).loss.backward()
            for master, param in zip(masters, params):
                master.grad = param.grad.float()
                param.grad = None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for master, param in zip(masters, params):
                    param.copy_(master)
            stamps.append(clock())
        return stamps

    return run


def trainer_loop(settings: LoopSettings, precision: str = "fp32", keep_freed_memory: bool = False) -> Loop:
    """transformers.Trainer with the engine's optimizer (`adamw_torch`; Trainer's default is the fused
    variant), clipping and constant rate; `keep_freed_memory` runs it under the engine's heap setting."""

    def run(model, examples, pad_token_id, steps, clock=stamp):
        from transformers import Trainer, TrainerCallback, TrainingArguments

        class Stamps(TrainerCallback):
            def __init__(self):
                self.stamps = []

            def on_step_end(self, args, state, control, **kwargs):
                self.stamps.append(clock())

        dataset = [{key: value[0] for key, value in collate([example], pad_token_id).items()} for example in examples]
        with tempfile.TemporaryDirectory() as output_dir:
            args = TrainingArguments(
                output_dir=output_dir, per_device_train_batch_size=settings.batch, max_steps=steps,
                learning_rate=settings.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, optim="adamw_torch", bf16=precision == "bf16", eval_strategy="no",
                save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
                dataloader_num_workers=0, dataloader_pin_memory=False, use_cpu=True, seed=settings.seed,
            )
            callback = Stamps()
            with freed_memory_kept() if keep_freed_memory else contextlib.nullcontext():
                Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback]).train()
        return callback.stamps

    return run
