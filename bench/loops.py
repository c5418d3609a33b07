"""What the engine benchmarks share (bench/engine_real.py, bench/engine_throughput.py --model tiny): the training
loops they time side by side, the rotated rounds and the peak-memory readings.

Every loop is `(model, examples, pad_token_id, steps, clock=stamp) -> stamps`: `steps` optimizer steps on packed
blocks (`{"input_ids": [block]}`), one `clock()` reading after each, from which `throughput` takes tokens/s.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
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
from tasks.compare import _peak_rss_kib, _reset_peak_rss  # noqa: F401 - the peak-RSS readings `perennial compare` takes

ROOT = Path(__file__).resolve().parents[1]
Stamp = tuple[float, float]


@dataclass(frozen=True)
class LoopSettings:
    """What every loop of one benchmark shares: `batch` blocks of `block` tokens a step, AdamW at a constant `lr`."""

    batch: int
    block: int
    lr: float
    seed: int = 0

    def optim_config(self, steps: int) -> OptimConfig:
        # No warm-up and a constant rate: the plain loop and Trainer have no schedule either.
        return OptimConfig(lr=self.lr, batch_size=self.batch, max_steps=steps, warmup_steps=0, schedule="constant",
                           max_length=self.block, log_every=10**6)


def stamp() -> Stamp:
    """(wall clock, this process's CPU time), taken after every optimizer step."""
    return time.perf_counter(), time.process_time()


def throughput(stamps: list[Stamp], warmup: int, settings: LoopSettings) -> dict[str, float]:
    """Tokens/s after `warmup` steps: per CPU-second of this process and per wall-second at the median step (a
    stalled step does not move a median), and over the whole wall-clock window, stalls included."""
    after = stamps[warmup - 1 :]
    wall = [b[0] - a[0] for a, b in zip(after, after[1:])]
    cpu = [b[1] - a[1] for a, b in zip(after, after[1:])]
    tokens = settings.batch * settings.block
    return {"cpu": tokens / statistics.median(cpu), "wall": tokens / statistics.median(wall), "wall_window": tokens * len(wall) / sum(wall)}


def rotated_rounds(rotated: list[str], rest: list[str], rounds: int, measure: Callable[[str], dict]) -> tuple[dict, dict]:
    """`rounds` rounds of `rotated` (who goes first moves on each round, so a burst of outside load does not land on
    one run only), then `rest` once; every number of each run, and their medians."""
    runs: dict[str, dict[str, list[float]]] = {}
    schedule = [rotated[r % len(rotated):] + rotated[: r % len(rotated)] for r in range(rounds)] if rotated else []
    for index, order in enumerate([*schedule, rest]):
        for name in order:
            for key, value in measure(name).items():
                runs.setdefault(name, {}).setdefault(key, []).append(value)
            print(f"round {min(index, rounds - 1) + 1}/{rounds} {name:34s} "
                  + "  ".join(f"{key} {values[-1]:,.0f}" for key, values in runs[name].items()), flush=True)
    return runs, {name: {key: statistics.median(values) for key, values in run.items()} for name, run in runs.items()}


def child(module: str, *args: str) -> dict:
    """`python -m module args` in a fresh process (its allocator and peak RSS its own); the JSON line it printed last."""
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def engine_loop(settings: LoopSettings, precision: str = "fp32"):
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


def plain_loop(settings: LoopSettings, precision: str = "fp32", compiled: bool = False):
    """The least a loop can do: pre-stacked batches, forward (autocast for bf16), backward, AdamW step."""

    def run(model, examples, pad_token_id, steps, clock=stamp):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
        forward = torch.compile(model) if compiled else model
        model.train()
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


def plain_bf16_weights_loop(settings: LoopSettings):
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
                master.grad, param.grad = param.grad.float(), None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for master, param in zip(masters, params):
                    param.copy_(master)
            stamps.append(clock())
        return stamps

    return run


def trainer_loop(settings: LoopSettings, precision: str = "fp32", keep_freed_memory: bool = False):
    """transformers.Trainer with the engine's optimizer (`adamw_torch`; Trainer's default is the fused variant),
    clipping and constant rate; `keep_freed_memory` runs it under the engine's heap setting."""

    def run(model, examples, pad_token_id, steps, clock=stamp):
        from transformers import Trainer, TrainerCallback, TrainingArguments

        stamps = []
        callback = type("Stamps", (TrainerCallback,), {"on_step_end": lambda self, *args, **kwargs: stamps.append(clock())})
        dataset = [{key: value[0] for key, value in collate([example], pad_token_id).items()} for example in examples]
        with tempfile.TemporaryDirectory() as output_dir:
            args = TrainingArguments(
                output_dir=output_dir, per_device_train_batch_size=settings.batch, max_steps=steps,
                learning_rate=settings.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, optim="adamw_torch", bf16=precision == "bf16", eval_strategy="no",
                save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
                dataloader_num_workers=0, dataloader_pin_memory=False, use_cpu=True, seed=settings.seed,
            )
            with freed_memory_kept() if keep_freed_memory else contextlib.nullcontext():
                Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback()]).train()
        return stamps

    return run
