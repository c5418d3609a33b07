"""Training throughput and memory of Perennial's engine beside a plain PyTorch loop and transformers.Trainer, on the CPU.

    python -m bench.engine_throughput [--model smollm2|tiny] [--steps N] [--warmup W] [--rounds R] [--threads T] [--quick]
    python -m bench.engine_throughput --activation-checkpointing [--steps N] [--warmup W] [--threads T]

--model smollm2 (default): SmolLM2-135M-Instruct, the embedded default, each run in a fresh process (glibc's allocator
defaults, as a user's process would have): the engine, the plain loop and Trainer in bf16 autocast and fp32 in rotated
rounds, then once each the other variants of RUNS; peak memory per tuning method and per CL method (its second task).
--model tiny: the demo-size tiny Llama, the three loops in fp32 in one process from the same initial weights (a
comparison of loops, not of precisions), one thread by default (on a busy machine a second OpenMP thread that loses
its core stalls every parallel region); peak memory per tuning method. Tokens/s at the median step after W warm-up
steps; memory: the Linux high-water mark above the resident size before the model is built, one fresh process each.
Results: bench/results/engine_throughput[_tiny].json and .md; `python -m bench.report --render` rewrites the .md.
--activation-checkpointing: only SmolLM2's peak memory and tokens/s with `optim.activation_checkpointing` off and on
(full and attn-proj, CKPT's longer blocks), one fresh process each; bench/results/engine_activation_checkpointing.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench.common import RESULTS_DIR, ROOT, child, report_head, section_head, table, write_results
from models.allocator import freed_memory_kept
from models.data import collate, encode_instruction, pack_texts
from models.engine import precision_context, stream_indices, train
from models.tuning import apply_tuning, count_parameters
from perennial.config import OptimConfig, TuningConfig
from tasks.compare import _peak_rss_kib, _reset_peak_rss  # the peak-RSS readings `perennial compare` takes

MODULE = "bench.engine_throughput"
CACHE = ROOT / ".perennial" / "cache" / "gguf"
MODEL = "smollm2-135m-instruct"
SEED = 0
Stamp = tuple[float, float]


@dataclass(frozen=True)
class LoopSettings:
    """What every loop of one benchmark shares: `batch` blocks of `block` tokens a step, AdamW at a constant `lr`."""

    batch: int
    block: int
    lr: float
    seed: int = SEED

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


def plain_loop(settings: LoopSettings, precision: str = "fp32", compiled: bool = False, bf16_weights: bool = False):
    """The least a loop can do: pre-stacked batches, forward (autocast for bf16), backward, AdamW step. `bf16_weights`:
    bf16 weights and activations throughout (no autocast casts), AdamW on fp32 master copies."""

    def run(model, examples, pad_token_id, steps, clock=stamp):
        params = [p for p in model.parameters() if p.requires_grad]
        masters = [p.detach().float().clone().requires_grad_(True) for p in params] if bf16_weights else params
        (model.to(torch.bfloat16) if bf16_weights else model).train()
        optimizer = torch.optim.AdamW(masters, lr=settings.lr)
        forward = torch.compile(model) if compiled else model
        stamps = []
        for ids in _batches(examples, steps, settings):
            with precision_context(precision, torch.device("cpu")):
                loss = forward(input_ids=ids, labels=ids).loss
            loss.backward()
            if bf16_weights:
                for master, param in zip(masters, params):
                    master.grad, param.grad = param.grad.float(), None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if bf16_weights:
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


REAL, TINY = LoopSettings(batch=8, block=96, lr=5e-5), LoopSettings(batch=16, block=128, lr=3e-3)
# name -> (tuning method, loop); the first six are the rotated side-by-side comparison, the others run once
RUNS = {
    "engine bf16": ("full", engine_loop(REAL, "bf16")),
    "engine fp32": ("full", engine_loop(REAL, "fp32")),
    "plain bf16": ("full", plain_loop(REAL, "bf16")),
    "plain fp32": ("full", plain_loop(REAL, "fp32")),
    "trainer bf16": ("full", trainer_loop(REAL, "bf16")),
    "trainer fp32": ("full", trainer_loop(REAL, "fp32")),
    "engine attn-proj bf16": ("attn-proj", engine_loop(REAL, "bf16")),
    "engine attn-proj fp32": ("attn-proj", engine_loop(REAL, "fp32")),
    "plain bf16 weights + fp32 master": ("full", plain_loop(REAL, bf16_weights=True)),
    "plain bf16 + torch.compile": ("full", plain_loop(REAL, "bf16", compiled=True)),
    "trainer bf16, freed memory kept": ("full", trainer_loop(REAL, "bf16", keep_freed_memory=True)),
}
ROTATED = list(RUNS)[:6]
TINY_LOOPS = {"engine": engine_loop(TINY), "plain": plain_loop(TINY), "trainer": trainer_loop(TINY)}
# per model: the defaults of --steps, --warmup, --rounds, --rss-steps, --threads; what --quick sets of them; the
# memory runs (kind, methods) and those of --quick; the results name
PROFILES = {
    "smollm2": ((8, 2, 2, 3, 2), (3, 1, 1, 2), [("tuning", ["full", "lora", "mora", "attn-proj", "mlp-gate-up", "osf"]),
                                                  ("cl", ["ewc", "lwf", "seekr", "olora", "averaging"])],
                [("tuning", ["full", "attn-proj"]), ("cl", ["lwf"])], "engine_throughput"),
    "tiny": ((40, 5, 3, 10, 1), (8, 2, 1, 2), [("tuning", ["full", "lora", "mora", "attn-proj", "mlp-gate-up"])],
             [("tuning", ["full", "lora"])], "engine_throughput_tiny"),
}
# what each ratio (of tokens per wall-second) divides by what; the targets
RATIOS = {
    "engine bf16 / engine fp32 (full)": ("engine bf16", "engine fp32"),
    "engine bf16 / engine fp32 (attn-proj)": ("engine attn-proj bf16", "engine attn-proj fp32"),
    "engine / plain (bf16)": ("engine bf16", "plain bf16"),
    "engine / plain (fp32)": ("engine fp32", "plain fp32"),
    "engine / Trainer (bf16)": ("engine bf16", "trainer bf16"),
    "engine / Trainer (fp32)": ("engine fp32", "trainer fp32"),
    "plain bf16 weights + fp32 master / plain bf16 autocast": ("plain bf16 weights + fp32 master", "plain bf16"),
    "plain bf16 + torch.compile / plain bf16 autocast": ("plain bf16 + torch.compile", "plain bf16"),
    "engine / Trainer with freed memory kept (bf16)": ("engine bf16", "trainer bf16, freed memory kept"),
}
TARGETS = {"engine bf16 / engine fp32 (full)": 1.5, "engine / Trainer (bf16)": 1.0, "engine / Trainer (fp32)": 1.0}


def demo_setup():
    """Tokenizer, packed blocks and a freshly initialised demo-size model, all deterministic."""
    from models.tiny import build_tiny_llama, train_tokenizer
    from perennial.config import DemoDataConfig, TinyModelConfig
    from perennial.demo_data import general_corpus

    demo = DemoDataConfig()
    texts = general_corpus(demo.general_docs, demo.seed)
    tokenizer = train_tokenizer(texts, TinyModelConfig().vocab_size)
    blocks = [{"input_ids": block} for block in pack_texts(tokenizer, texts, TINY.block) if len(block) == TINY.block]
    torch.manual_seed(TINY.seed)
    return tokenizer, blocks, build_tiny_llama(tokenizer, TinyModelConfig())


def run_child(name: str, steps: int, warmup: int) -> dict:
    """In its own (fresh) process: one SmolLM2 throughput run, tokens/s and minor page faults per step."""
    from models.gguf import converted_dir
    from models.loading import load_model_and_tokenizer
    from perennial.demo_data import general_corpus

    model, tokenizer = load_model_and_tokenizer(converted_dir(MODEL, CACHE)[0])
    examples = [{"input_ids": block} for block in pack_texts(tokenizer, general_corpus(600, 1234), REAL.block) if len(block) == REAL.block]
    tuning, run = RUNS[name]
    model = apply_tuning(model, TuningConfig(method=tuning))
    faults = []

    def counted():
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        return stamp()

    stamps = run(model, examples, tokenizer.pad_token_id, steps, counted)
    if len(stamps) != steps:
        raise RuntimeError(f"{name} ran {len(stamps)} steps, not {steps}")
    after = faults[warmup - 1 :]
    return {**throughput(stamps, warmup, REAL), "minor_faults_per_step": statistics.median(b - a for a, b in zip(after, after[1:]))}


def rss_child(model_name: str, kind: str, name: str, steps: int) -> dict:
    """In its own process: a short engine run of one tuning method, or of one CL method's second task (SmolLM2 only)."""
    if model_name == "tiny":  # the model is built again after the baseline reading, so its weights count as training memory
        from models.tiny import build_tiny_llama
        from perennial.config import TinyModelConfig

        tokenizer, blocks, _init = demo_setup()
    else:
        from models.cl.base import TaskContext
        from models.cl.registry import build_plugins
        from models.gguf import converted_dir
        from models.loading import load_model_and_tokenizer
        from perennial.demo_data import demo_tasks, task_records

        folder, _ = converted_dir(MODEL, CACHE)
    reset = _reset_peak_rss()
    baseline = _peak_rss_kib()  # the high-water mark just reset: the resident size now
    if model_name == "tiny":
        torch.manual_seed(TINY.seed)
        model, tasks, optim = build_tiny_llama(tokenizer, TinyModelConfig()), [blocks], TINY.optim_config(steps)
    else:
        model, tokenizer = load_model_and_tokenizer(folder)
        tasks = [[encode_instruction(tokenizer, r["prompt"], r["response"], 64) for r in task_records(demo_tasks(1234)[task], 64, 4, 1234)
                  if r["split"] == "train"] for task in ("zorbish", "arithmetic")]
        optim = OptimConfig(lr=REAL.lr, batch_size=REAL.batch, max_steps=steps, warmup_steps=0, max_length=64, log_every=10**6)
    tuning = name if kind == "tuning" else ("lora" if name == "olora" else "full")
    model = apply_tuning(model, TuningConfig(method=tuning))
    trainable, total = count_parameters(model)
    # EWC's Fisher from 8 examples, not its default 64: the memory it keeps (a Fisher and an anchor the size
    # of the trained weights) does not depend on the count, the minutes of per-example backward passes do.
    plugins = build_plugins([{"name": name, **({"fisher_samples": 8} if name == "ewc" else {})}], seed=SEED) if kind == "cl" else []
    for index, examples in enumerate(tasks if kind == "cl" else tasks[:1]):
        if index == 1 and reset:
            _reset_peak_rss()  # the second task: the plugin now holds what it keeps from the first
        context = plugins and TaskContext(task_index=index, task_name=f"task-{index}", model=model, train_examples=examples,
                                          pad_token_id=tokenizer.pad_token_id)
        for plugin in plugins:
            plugin.before_task(context)
        started = time.perf_counter()
        result = train(model, examples, optim, seed=SEED, pad_token_id=tokenizer.pad_token_id, plugins=plugins,
                       **({"device": torch.device("cpu")} if model_name == "tiny" else {"precision": "auto"}))
        seconds = time.perf_counter() - started
        for plugin in plugins:
            plugin.after_task(context)
    return {
        "kind": kind, "method": name, "tuning": tuning, "trainable_params": trainable, "total_params": total,
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
        "rss_before_model_mib": round(baseline / 1024, 1),
        "training_peak_above_baseline_mib": round((_peak_rss_kib() - baseline) / 1024, 1) if reset else None,
        "steps": steps, "last_task_seconds": round(seconds, 1), "final_loss": result.losses[-1],
        "tokens_per_s_whole_run": round(result.tokens_per_second, 1),
    }


CKPT = LoopSettings(batch=4, block=512, lr=5e-5)  # long enough blocks that the activations (eager attention) weigh


def checkpointing_child(tuning: str, checkpointing: bool, steps: int, warmup: int) -> dict:
    """In its own process: SmolLM2 tuned by `tuning` trains `steps` engine steps (precision auto) on CKPT blocks with
    activation checkpointing off or on; peak RSS above the resident size before the model is loaded, tokens/s."""
    from models.gguf import converted_dir
    from models.loading import load_model_and_tokenizer
    from perennial.demo_data import general_corpus

    folder, _ = converted_dir(MODEL, CACHE)
    reset = _reset_peak_rss()
    baseline = _peak_rss_kib()
    model, tokenizer = load_model_and_tokenizer(folder)
    examples = [{"input_ids": block} for block in pack_texts(tokenizer, general_corpus(600, 1234), CKPT.block) if len(block) == CKPT.block]
    model = apply_tuning(model, TuningConfig(method=tuning))
    optim = CKPT.optim_config(steps).model_copy(update={"activation_checkpointing": checkpointing})
    stamps = []
    result = train(model, examples, optim, seed=SEED, pad_token_id=tokenizer.pad_token_id, precision="auto",
                   on_step_end=lambda step, _model: stamps.append(stamp()))
    return {"tuning": tuning, "activation_checkpointing": checkpointing, "final_loss": result.losses[-1],
            "training_peak_above_baseline_mib": round((_peak_rss_kib() - baseline) / 1024, 1) if reset else None,
            "tokens_per_s": throughput(stamps, warmup, CKPT)}


def measure_checkpointing(args, argv: list[str], load_before: float) -> dict:
    rows = []
    for tuning in ("full", "attn-proj"):
        for on in (False, True):
            rows.append(child(MODULE, "--checkpointing-child", tuning, str(on), "--steps", str(args.steps),
                              "--warmup", str(args.warmup), "--threads", str(args.threads)))
            print(json.dumps(rows[-1]), flush=True)
    return {**report_head(MODULE, argv, load_before), "settings": {"model": MODEL, "steps": args.steps, "warmup": args.warmup,
            "batch": CKPT.batch, "block": CKPT.block, "threads": args.threads, "precision": "auto", "attn_implementation": "eager"},
            "runs": rows}


def measure_rss(args) -> list[dict]:
    rows = []
    for kind, names in PROFILES[args.model][3 if args.quick else 2]:
        for name in names:
            try:
                rows.append(child(MODULE, "--model", args.model, "--rss-child", kind, name, "--rss-steps", str(args.rss_steps),
                                  "--threads", str(args.threads)))
            except RuntimeError as error:
                if args.model == "tiny":
                    raise
                rows.append({"kind": kind, "method": name, "error": str(error).strip().splitlines()[-1]})
            print(f"memory {kind:6s} {name:12s} {rows[-1].get('training_peak_above_baseline_mib', rows[-1].get('error'))}", flush=True)
    return rows


def measure_real(args, argv: list[str], load_before: float) -> dict:
    names = ["engine bf16", "engine fp32"] if args.quick else list(RUNS)
    flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    runs, median = rotated_rounds([name for name in ROTATED if name in names], [name for name in names if name not in ROTATED], args.rounds,
                                  lambda name: child(MODULE, "--run-child", name, *flags))
    return {
        **report_head(MODULE, argv, load_before),
        "settings": {"model": MODEL, "steps": args.steps, "warmup_steps_excluded": args.warmup, "rounds": args.rounds,
                     "batch": REAL.batch, "block": REAL.block, "lr": REAL.lr, "threads": args.threads, "process_per_run": True,
                     "trainer_optim": "adamw_torch", "attn_implementation": "eager"},
        "tokens_per_s": {name: {"tuning": RUNS[name][0], "median": median[name], "runs": runs[name]} for name in names},
        "ratios": {key: median[a]["wall"] / median[b]["wall"] if a in median and b in median else None for key, (a, b) in RATIOS.items()},
        "peak_rss": measure_rss(args),
    }


def measure_tiny(args, argv: list[str], load_before: float) -> dict:
    from perennial.config import TinyModelConfig

    tokenizer, examples, init = demo_setup()

    def measure(name: str) -> dict:  # from the same initial weights every time
        stamps = TINY_LOOPS[name](copy.deepcopy(init), examples, tokenizer.pad_token_id, args.steps)
        assert len(stamps) == args.steps, f"{name} ran {len(stamps)} steps, not {args.steps}"
        return throughput(stamps, args.warmup, TINY)

    runs, median = rotated_rounds(list(TINY_LOOPS), [], args.rounds, measure)
    return {
        **report_head(MODULE, argv, load_before),
        "settings": {"steps": args.steps, "warmup_steps_excluded": args.warmup, "rounds": args.rounds, "batch": TINY.batch,
                     "block": TINY.block, "examples": len(examples), "model": TinyModelConfig().model_dump(), "lr": TINY.lr,
                     "trainer_optim": "adamw_torch", "attn_implementation": "eager", "device": "cpu", "threads": args.threads},
        "tokens_per_s": {name: {"median": median[name], "runs": runs[name]} for name in TINY_LOOPS},
        "clocks": {"cpu": "tokens per CPU-second of the training process at the median step (headline)",
                   "wall": "tokens per wall-clock second at the median step",
                   "wall_window": "tokens per wall-clock second over all timed steps, stalls included"},
        "ratios": {clock: {f"engine/{other}": median["engine"][clock] / median[other][clock] for other in ("plain", "trainer")}
                   for clock in ("cpu", "wall", "wall_window")},
        "peak_rss_by_tuning": measure_rss(args),
    }


def markdown(report: dict) -> str:
    """The report's section of BENCHMARKS.md: `## Training engine` (SmolLM2) or `## Training engine: the tiny model`."""
    return (tiny_markdown if "clocks" in report else real_markdown)(report)


def real_markdown(report: dict) -> str:
    settings, median = report["settings"], {k: v["median"] for k, v in report["tokens_per_s"].items()}
    lines = [
        *section_head("Training engine", report), "",
        f"SmolLM2-135M-Instruct (the embedded default) on the demo general corpus, {settings['batch']} blocks of "
        f"{settings['block']} tokens a step, AdamW at {settings['lr']}, {settings['steps']} steps of which the first "
        f"{settings['warmup_steps_excluded']} are excluded, {settings['threads']} torch threads; the first six runs in "
        f"rotated order over {settings['rounds']} rounds (median), the others once, each run in a fresh process. bf16 = "
        "autocast with fp32 master weights unless named otherwise. The engine's loop keeps freed heap memory for reuse "
        "(models/allocator.py); the plain loop and Trainer run with glibc's defaults, as a user's process would.", "",
        "### Throughput (tokens/s at the median step)", "",
        table(["run", "tuning", "per wall-second (headline)", "per CPU-second", "minor page faults per step"],
              [[name, report["tokens_per_s"][name]["tuning"], f"{m['wall']:.0f}", f"{m['cpu']:.0f}",
                f"{m['minor_faults_per_step']:,.0f}" if "minor_faults_per_step" in m else "n/a"] for name, m in median.items()]), "",
        table(["ratio (wall)", "value", "target"],
              [[key, "n/a" if value is None else f"{value:.2f}x",
                "" if key not in TARGETS else (f">= {TARGETS[key]}x: " + ("not measured" if value is None else "met" if value >= TARGETS[key] else "NOT met"))]
               for key, value in report["ratios"].items()]),
    ]
    if rss := report.get("peak_rss"):
        lines += [
            "", f"### Peak resident memory ({rss[0].get('steps', '?')} engine steps, bf16 autocast, one fresh process each)", "",
            "Above the process's resident size before the model is built; a CL method's row is its second task "
            "(EWC holds the first task's Fisher, LwF and SEEKR a frozen teacher, averaging the previous weights). "
            "Replay has no plugin state: its cost is the replayed examples, not a model-sized tensor.", "",
            table(["kind", "method", "tuning", "trainable params", "training peak above pre-model RSS (MiB)"],
                  [[row["kind"], row["method"], row.get("tuning", ""), row.get("trainable_params", ""),
                    row.get("error") or ("n/a" if row["training_peak_above_baseline_mib"] is None else f"{row['training_peak_above_baseline_mib']:.0f}")]
                   for row in rss]),
        ]
    return "\n".join(lines + (["", report["reading"]] if report.get("reading") else [])) + "\n"


def tiny_markdown(report: dict) -> str:
    settings, median, ratios = report["settings"], {k: v["median"] for k, v in report["tokens_per_s"].items()}, report["ratios"]
    lines = [
        *section_head("Training engine: the tiny model", report), "",
        f"The demo-size tiny Llama (hidden {settings['model']['hidden_size']}, {settings['model']['num_hidden_layers']} layers) on the demo general "
        f"corpus, {settings['batch']} blocks of {settings['block']} tokens a step, AdamW, {settings['steps']} steps of which "
        f"the first {settings['warmup_steps_excluded']} are excluded, {settings['threads']} torch thread(s), {settings['device']}; "
        f"median over {settings['rounds']} rounds in rotated order.", "",
        "### Throughput (tokens/s)", "",
        table(["method", "per CPU-second (headline)", "per wall-second", "wall, whole window (stalls included)"],
              [[name, f"{m['cpu']:.0f}", f"{m['wall']:.0f}", f"{m['wall_window']:.0f}"] for name, m in median.items()]), "",
        table(["ratio", "CPU-second", "wall-second", "whole window", "target >= 0.95 (CPU-second)"],
              [[key, *(f"{ratios[clock][key]:.3f}" for clock in ("cpu", "wall", "wall_window")),
                "met" if ratios["cpu"][key] >= 0.95 else "NOT met"] for key in ("engine/plain", "engine/trainer")]), "",
        f"Reading: the engine trains at {ratios['cpu']['engine/plain']:.2f}x the tokens/s of a plain PyTorch loop and "
        f"{ratios['cpu']['engine/trainer']:.2f}x that of transformers.Trainer on the same model, data and batch.",
    ]
    if rss := report.get("peak_rss_by_tuning"):
        above = lambda row: row["training_peak_above_baseline_mib"]  # noqa: E731 - None where the mark cannot be reset
        lines += [
            "", f"### Peak resident memory by tuning method ({rss[0]['steps']} engine steps, one fresh process each)", "",
            table(["tuning", "trainable params", "ru_maxrss MiB (process lifetime)", "training peak above pre-model RSS MiB",
                   "tokens/s (whole run)"],
                  [[row["method"], row["trainable_params"], f"{row['ru_maxrss_mib']:.1f}", "n/a" if above(row) is None else f"{above(row):.1f}",
                    f"{row['tokens_per_s_whole_run']:.0f}"] for row in rss]), "",
            f"Reading: about {min(r['rss_before_model_mib'] for r in rss):.0f} MiB are resident before the model is built "
            "(torch, transformers, tokenizer, data); training then adds "
            + ", ".join(f"{r['method']} {above(r):.0f}" for r in rss if above(r) is not None) + " MiB at its peak.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(PROFILES), default="smollm2", help="smollm2: the embedded default model; tiny: the demo Llama")
    parser.add_argument("--steps", type=int, help="optimizer steps per run, warm-up included (default: smollm2 8, tiny 40)")
    parser.add_argument("--warmup", type=int, help="steps excluded from the timing (default: smollm2 2, tiny 5)")
    parser.add_argument("--rounds", type=int, help="rotated rounds of the side-by-side runs, median reported (default: smollm2 2, tiny 3)")
    parser.add_argument("--rss-steps", type=int, help="engine steps per memory run (default: smollm2 3, tiny 10)")
    parser.add_argument("--threads", type=int, help="torch threads (default: smollm2 2, tiny 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps, one round, the engine runs (smollm2) and a few memory rows")
    parser.add_argument("--rss-child", nargs=2, metavar=("KIND", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--run-child", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help="the JSON report, the .md beside it (default bench/results/engine_throughput[_tiny].json)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="only SmolLM2's peak memory and tokens/s with optim.activation_checkpointing off and on (default 4 steps, 1 warm-up, 1 thread)")
    parser.add_argument("--checkpointing-child", nargs=2, metavar=("TUNING", "ON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.activation_checkpointing or args.checkpointing_child:
        args.steps, args.warmup, args.threads = args.steps or 4, args.warmup or 1, args.threads or 1
        torch.set_num_threads(args.threads)
        if args.checkpointing_child:
            tuning, on = args.checkpointing_child
            print(json.dumps(checkpointing_child(tuning, on == "True", args.steps, args.warmup)))
            return 0
        report = measure_checkpointing(args, argv, os.getloadavg()[0])
        path = args.output or RESULTS_DIR / "engine_activation_checkpointing.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
        return 0
    defaults, quick, _, _, name = PROFILES[args.model]
    for index, key in enumerate(("steps", "warmup", "rounds", "rss_steps", "threads")):
        if getattr(args, key) is None or (args.quick and index < len(quick)):
            setattr(args, key, quick[index] if args.quick and index < len(quick) else defaults[index])
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    torch.set_num_threads(args.threads)
    if args.rss_child or args.run_child:
        print(json.dumps(rss_child(args.model, *args.rss_child, args.rss_steps) if args.rss_child else run_child(args.run_child, args.steps, args.warmup)))
        return 0
    output = args.output or RESULTS_DIR / f"{name}.json"
    report = (measure_tiny if args.model == "tiny" else measure_real)(args, argv, os.getloadavg()[0])
    text = markdown(report)
    print(text)
    write_results(output.stem, report, text, output.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
