"""Training throughput and memory of Perennial's engine on SmolLM2-135M-Instruct (the embedded default) beside a
plain PyTorch loop and transformers.Trainer, on the CPU.

    python -m bench.engine_throughput [--steps 8] [--warmup 2] [--rounds 2] [--rss-steps 3] [--threads 2] [--quick]
    python -m bench.engine_throughput --activation-checkpointing [--steps 4] [--warmup 1] [--threads 1]

Each run is a fresh process (glibc's allocator defaults, as a user's process would have): the engine, the plain loop
and Trainer in bf16 autocast and fp32 in rotated rounds, then once each the other variants of RUNS; then peak memory
per tuning method and per CL method (its second task). Tokens/s at the median step after the warm-up steps; memory:
the Linux high-water mark above the resident size before the model is built. Results:
bench/results/engine_throughput.json and .md; `python -m bench.report --render` rewrites the .md.
--activation-checkpointing: only the peak memory and tokens/s with `optim.activation_checkpointing` off and on (full
and attn-proj, CKPT's longer blocks); bench/results/engine_activation_checkpointing.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, ROOT, child, report_head, section_head, table, write_results
from models.allocator import freed_memory_kept
from models.data import collate, encode_instruction, pack_texts
from models.engine import precision_context, stream_indices, train
from models.loading import load_model_and_tokenizer
from models.tuning import apply_tuning, count_parameters
from perennial.config import OptimConfig, TuningConfig
from tasks.compare import _peak_rss_kib, _reset_peak_rss  # the peak-RSS readings `perennial compare` takes

MODULE = "bench.engine_throughput"
CACHE = ROOT / ".perennial" / "cache" / "gguf"
MODEL = "smollm2-135m-instruct"
SEED = 0


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


def stamp() -> tuple[float, float]:
    """(wall clock, this process's CPU time), taken after every optimizer step."""
    return time.perf_counter(), time.process_time()


def throughput(stamps: list[tuple[float, float]], warmup: int, settings: LoopSettings) -> dict[str, float]:
    """Tokens/s at the median step after `warmup` steps (a stalled step does not move a median), per wall-second
    and per CPU-second of this process."""
    after = stamps[warmup - 1 :]
    tokens = settings.batch * settings.block
    return {clock: tokens / statistics.median(b[index] - a[index] for a, b in zip(after, after[1:]))
            for index, clock in enumerate(("wall", "cpu"))}


def engine_loop(settings: LoopSettings, precision: str = "fp32"):
    """Perennial's engine (`models.engine.train`), its bookkeeping included."""

    def run(model, examples, pad_token_id, steps, clock=stamp):
        stamps = []
        train(model, examples, settings.optim_config(steps), seed=settings.seed, pad_token_id=pad_token_id,
              device=torch.device("cpu"), precision=precision, on_step_end=lambda step, _model: stamps.append(clock()))
        return stamps

    return run


def plain_loop(settings: LoopSettings, precision: str = "fp32", compiled: bool = False, bf16_weights: bool = False):
    """The least a loop can do: the engine's batches (`stream_indices`) pre-stacked, forward (autocast for bf16),
    backward, AdamW step. `bf16_weights`: bf16 weights and activations throughout (no autocast casts), AdamW on fp32
    master copies."""

    def run(model, examples, pad_token_id, steps, clock=stamp):
        params = [p for p in model.parameters() if p.requires_grad]
        masters = [p.detach().float().clone().requires_grad_(True) for p in params] if bf16_weights else params
        (model.to(torch.bfloat16) if bf16_weights else model).train()
        optimizer = torch.optim.AdamW(masters, lr=settings.lr)
        forward = torch.compile(model) if compiled else model
        data = torch.tensor([example["input_ids"] for example in examples])
        order = torch.tensor(stream_indices(len(examples), settings.seed, 0, steps * settings.batch)).view(steps, settings.batch)
        stamps = []
        for ids in data[order]:
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


REAL = LoopSettings(batch=8, block=96, lr=5e-5)
CKPT = LoopSettings(batch=4, block=512, lr=5e-5)  # long enough blocks that the activations (eager attention) weigh
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
# the memory runs (kind, methods), and those of --quick
MEMORY = [("tuning", ["full", "lora", "mora", "attn-proj", "mlp-gate-up", "osf"]), ("cl", ["ewc", "lwf", "seekr", "olora", "averaging"])]
QUICK_MEMORY = [("tuning", ["full", "attn-proj"]), ("cl", ["lwf"])]
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


def smollm2() -> Path:
    """SmolLM2's model folder, converted from its GGUF file on first use."""
    from models.gguf import converted_dir

    return converted_dir(MODEL, CACHE)[0]


def general_blocks(tokenizer, block: int) -> list[dict]:
    from perennial.demo_data import general_corpus

    return [{"input_ids": ids} for ids in pack_texts(tokenizer, general_corpus(600, 1234), block) if len(ids) == block]


def throughput_child(name: str, steps: int, warmup: int) -> dict:
    """In its own (fresh) process: one throughput run, tokens/s and minor page faults per step."""
    model, tokenizer = load_model_and_tokenizer(smollm2())
    tuning, run = RUNS[name]
    faults = []

    def counted():
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        return stamp()

    stamps = run(apply_tuning(model, TuningConfig(method=tuning)), general_blocks(tokenizer, REAL.block), tokenizer.pad_token_id, steps, counted)
    if len(stamps) != steps:
        raise RuntimeError(f"{name} ran {len(stamps)} steps, not {steps}")
    after = faults[warmup - 1 :]
    return {**throughput(stamps, warmup, REAL), "minor_faults_per_step": statistics.median(b - a for a, b in zip(after, after[1:]))}


def memory_child(kind: str, name: str, steps: int) -> dict:
    """In its own process: a short engine run of one tuning method, or of one CL method's second task."""
    from models.cl.base import TaskContext
    from models.cl.registry import build_plugins
    from perennial.demo_data import demo_tasks, task_records

    folder = smollm2()
    reset = _reset_peak_rss()
    baseline = _peak_rss_kib()  # the high-water mark just reset: the resident size now
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
        result = train(model, examples, optim, seed=SEED, pad_token_id=tokenizer.pad_token_id, plugins=plugins, precision="auto")
        seconds = time.perf_counter() - started
        for plugin in plugins:
            plugin.after_task(context)
    return {
        "kind": kind, "method": name, "tuning": tuning, "trainable_params": trainable, "total_params": total,
        "rss_before_model_mib": round(baseline / 1024, 1),
        "training_peak_above_baseline_mib": round((_peak_rss_kib() - baseline) / 1024, 1) if reset else None,
        "steps": steps, "last_task_seconds": round(seconds, 1), "final_loss": result.losses[-1],
    }


def checkpointing_child(tuning: str, checkpointing: bool, steps: int, warmup: int) -> dict:
    """In its own process: SmolLM2 tuned by `tuning` trains `steps` engine steps (precision auto) on CKPT blocks with
    activation checkpointing off or on; peak RSS above the resident size before the model is loaded, tokens/s."""
    folder = smollm2()
    reset = _reset_peak_rss()
    baseline = _peak_rss_kib()
    model, tokenizer = load_model_and_tokenizer(folder)
    optim = CKPT.optim_config(steps).model_copy(update={"activation_checkpointing": checkpointing})
    stamps = []
    result = train(apply_tuning(model, TuningConfig(method=tuning)), general_blocks(tokenizer, CKPT.block), optim, seed=SEED,
                   pad_token_id=tokenizer.pad_token_id, precision="auto", on_step_end=lambda step, _model: stamps.append(stamp()))
    return {"tuning": tuning, "activation_checkpointing": checkpointing, "final_loss": result.losses[-1],
            "training_peak_above_baseline_mib": round((_peak_rss_kib() - baseline) / 1024, 1) if reset else None,
            "tokens_per_s": throughput(stamps, warmup, CKPT)}


CHILDREN = {"throughput": throughput_child, "memory": memory_child, "checkpointing": checkpointing_child}


def measure_checkpointing(args, argv: list[str], load_before: float) -> dict:
    rows = [child(MODULE, {"run": "checkpointing", "tuning": tuning, "checkpointing": on, "steps": args.steps, "warmup": args.warmup,
                           "threads": args.threads}) for tuning in ("full", "attn-proj") for on in (False, True)]
    return {**report_head(MODULE, argv, load_before), "settings": {"model": MODEL, "steps": args.steps, "warmup": args.warmup,
            "batch": CKPT.batch, "block": CKPT.block, "threads": args.threads, "precision": "auto", "attn_implementation": "eager"},
            "runs": rows}


def measure(args, argv: list[str], load_before: float) -> dict:
    names = ["engine bf16", "engine fp32"] if args.quick else list(RUNS)
    # ROTATED in `rounds` rounds (who goes first moves on each round, so a burst of outside load does not land on one
    # run only), then the others once
    rotated = [name for name in ROTATED if name in names]
    schedule = [*(rotated[r % len(rotated):] + rotated[: r % len(rotated)] for r in range(args.rounds)), [n for n in names if n not in ROTATED]]
    runs: dict[str, dict[str, list[float]]] = {}
    for index, order in enumerate(schedule):
        for name in order:
            for key, value in child(MODULE, {"run": "throughput", "name": name, "steps": args.steps, "warmup": args.warmup,
                                            "threads": args.threads}).items():
                runs.setdefault(name, {}).setdefault(key, []).append(value)
            print(f"round {min(index, args.rounds - 1) + 1}/{args.rounds} {name:34s} "
                  + "  ".join(f"{key} {values[-1]:,.0f}" for key, values in runs[name].items()), flush=True)
    median = {name: {key: statistics.median(values) for key, values in run.items()} for name, run in runs.items()}
    memory = []
    for kind, methods in QUICK_MEMORY if args.quick else MEMORY:
        for method in methods:
            try:
                memory.append(child(MODULE, {"run": "memory", "kind": kind, "name": method, "steps": args.rss_steps, "threads": args.threads}))
            except RuntimeError as error:  # a method that does not fit gets a row saying why
                memory.append({"kind": kind, "method": method, "error": str(error).strip().splitlines()[-1]})
            print(f"memory {kind:6s} {method:12s} {memory[-1].get('training_peak_above_baseline_mib', memory[-1].get('error'))}", flush=True)
    return {
        **report_head(MODULE, argv, load_before),
        "settings": {"model": MODEL, "steps": args.steps, "warmup_steps_excluded": args.warmup, "rounds": args.rounds,
                     "batch": REAL.batch, "block": REAL.block, "lr": REAL.lr, "threads": args.threads, "process_per_run": True,
                     "trainer_optim": "adamw_torch", "attn_implementation": "eager"},
        "tokens_per_s": {name: {"tuning": RUNS[name][0], "median": median[name], "runs": runs[name]} for name in names},
        "ratios": {key: median[a]["wall"] / median[b]["wall"] if a in median and b in median else None for key, (a, b) in RATIOS.items()},
        "peak_rss": memory,
    }


def markdown(report: dict) -> str:
    """The report's section of BENCHMARKS.md, `## Training engine`."""
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
                f"{m['minor_faults_per_step']:,.0f}"] for name, m in median.items()]), "",
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="optimizer steps per run, warm-up included (default 8; --activation-checkpointing 4)")
    parser.add_argument("--warmup", type=int, help="steps excluded from the timing (default 2; --activation-checkpointing 1)")
    parser.add_argument("--rounds", type=int, default=2, help="rotated rounds of the side-by-side runs, median reported (default 2)")
    parser.add_argument("--rss-steps", type=int, default=3, help="engine steps per memory run (default 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default 2; --activation-checkpointing 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, one round, the engine runs and a few memory rows")
    parser.add_argument("--output", type=Path, help="the JSON report, the .md beside it (default bench/results/engine_throughput.json)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="only the peak memory and tokens/s with optim.activation_checkpointing off and on")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a JSON job of CHILDREN, run in this fresh process
    args = parser.parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        torch.set_num_threads(job.pop("threads"))
        print(json.dumps(CHILDREN[job.pop("run")](**job)))  # the line `bench.common.child` reads
        return 0
    args.steps, args.warmup, args.threads = (given or default for given, default in zip(
        (args.steps, args.warmup, args.threads), (4, 1, 1) if args.activation_checkpointing else (8, 2, 2)))
    if args.quick:
        args.steps, args.warmup, args.rounds, args.rss_steps = 3, 1, 1, 2
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    if args.activation_checkpointing:
        output = args.output or RESULTS_DIR / "engine_activation_checkpointing.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(measure_checkpointing(args, argv, os.getloadavg()[0]), indent=2) + "\n")
        print(f"wrote {output}")
        return 0
    output = args.output or RESULTS_DIR / "engine_throughput.json"
    report = measure(args, argv, os.getloadavg()[0])
    text = markdown(report)
    print(text)
    write_results(output.stem, report, text, output.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
