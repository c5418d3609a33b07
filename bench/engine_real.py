"""Training throughput and memory on the embedded default model, SmolLM2-135M-Instruct, on the CPU.

    python -m bench.engine_throughput [--steps N] [--warmup W] [--rounds R] [--threads T] [--quick]

(`python -m bench.engine_real` is the same.) Every run trains from the same converted weights on the demo general
corpus packed into 96-token blocks, 8 a step, AdamW at a constant rate (the loops: bench/loops.py); tokens/s at the
median step after W warm-up steps. Side by side, the first six in rotated order over R rounds, the rest once:

- full fine-tuning through the engine, a plain PyTorch loop and transformers.Trainer, each in bf16 autocast (fp32
  master weights) and in fp32: engine bf16 / engine fp32 is what `precision: auto` buys on a CPU with native bf16;
  engine / plain and engine / Trainer in the same precision show what the engine's bookkeeping costs;
- attn-proj (the demo's CIT tuning) through the engine, bf16 and fp32;
- what might close the gap to bf16's 2x matmul ceiling, in the plain loop: bf16 weights with fp32 master copies
  (no per-op casts), and `torch.compile` (inductor) under autocast;
- Trainer in bf16 inside `models.allocator.freed_memory_kept`, the heap setting the engine's loop runs under.

Each run is its own fresh process (glibc's allocator defaults, as a user's process would have) and reports its
minor page faults per step. Then, one fresh process each, the peak resident memory of a short engine run per
tuning method and per CL method (a second task after a first, so EWC holds its Fisher and LwF and SEEKR their
teacher): the Linux high-water mark above the resident size before the model is built.

Results: bench/results/engine_throughput.json and .md (the `## Training engine` section of BENCHMARKS.md);
`--render` rewrites the .md from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.common import command, load_note, machine, machine_line, table, write_results
from bench.loops import (LoopSettings, _peak_rss_kib, _reset_peak_rss, child, engine_loop, plain_bf16_weights_loop, plain_loop,
                         rotated_rounds, stamp, throughput, trainer_loop)
from models.data import encode_instruction, pack_texts
from models.engine import train
from models.gguf import converted_dir
from models.loading import load_model_and_tokenizer
from models.tuning import apply_tuning, count_parameters
from perennial.config import OptimConfig, TuningConfig
from perennial.demo_data import demo_tasks, general_corpus, task_records

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "engine_throughput.json"
CACHE = ROOT / ".perennial" / "cache" / "gguf"
MODEL = "smollm2-135m-instruct"
SEED = 0
SETTINGS = LoopSettings(batch=8, block=96, lr=5e-5, seed=SEED)
TUNING_METHODS = ["full", "lora", "mora", "attn-proj", "mlp-gate-up", "osf"]
CL_METHODS = ["ewc", "lwf", "seekr", "olora", "averaging"]


def setup():
    folder, _ = converted_dir(MODEL, CACHE)
    model, tokenizer = load_model_and_tokenizer(folder)
    texts = general_corpus(600, 1234)
    blocks = [{"input_ids": block} for block in pack_texts(tokenizer, texts, SETTINGS.block) if len(block) == SETTINGS.block]
    return tokenizer, blocks, model


# name -> (tuning method, run); the first six are the rotated side-by-side comparison
RUNS = {
    "engine bf16": ("full", engine_loop(SETTINGS, "bf16")),
    "engine fp32": ("full", engine_loop(SETTINGS, "fp32")),
    "plain bf16": ("full", plain_loop(SETTINGS, "bf16")),
    "plain fp32": ("full", plain_loop(SETTINGS, "fp32")),
    "trainer bf16": ("full", trainer_loop(SETTINGS, "bf16")),
    "trainer fp32": ("full", trainer_loop(SETTINGS, "fp32")),
    "engine attn-proj bf16": ("attn-proj", engine_loop(SETTINGS, "bf16")),
    "engine attn-proj fp32": ("attn-proj", engine_loop(SETTINGS, "fp32")),
    "plain bf16 weights + fp32 master": ("full", plain_bf16_weights_loop(SETTINGS)),
    "plain bf16 + torch.compile": ("full", plain_loop(SETTINGS, "bf16", compiled=True)),
    "trainer bf16, freed memory kept": ("full", trainer_loop(SETTINGS, "bf16", keep_freed_memory=True)),
}
ROTATED = list(RUNS)[:6]


def rss_child(kind: str, name: str, steps: int) -> dict:
    """In its own process: a short engine run of one tuning method, or of one CL method's second task."""
    from models.cl.base import TaskContext
    from models.cl.registry import build_plugins

    folder, _ = converted_dir(MODEL, CACHE)
    reset = _reset_peak_rss()
    baseline = _peak_rss_kib()  # the high-water mark just reset: the resident size now
    model, tokenizer = load_model_and_tokenizer(folder)
    tuning = name if kind == "tuning" else ("lora" if name == "olora" else "full")
    model = apply_tuning(model, TuningConfig(method=tuning))
    trainable, total = count_parameters(model)
    # EWC's Fisher from 8 examples, not its default 64: the memory it keeps (a Fisher and an anchor the size
    # of the trained weights) does not depend on the count, the minutes of per-example backward passes do.
    settings = {"name": name, **({"fisher_samples": 8} if name == "ewc" else {})}
    plugins = build_plugins([settings], seed=SEED) if kind == "cl" else []
    catalogue = demo_tasks(1234)
    tasks = [[encode_instruction(tokenizer, r["prompt"], r["response"], 64)
              for r in task_records(catalogue[task], 64, 4, 1234) if r["split"] == "train"] for task in ("zorbish", "arithmetic")]
    optim = OptimConfig(lr=SETTINGS.lr, batch_size=SETTINGS.batch, max_steps=steps, warmup_steps=0, max_length=64, log_every=10**6)
    for index, examples in enumerate(tasks if kind == "cl" else tasks[:1]):
        if index == len(tasks) - 1 and reset:
            _reset_peak_rss()  # the second task: the plugin now holds what it keeps from the first
        context = TaskContext(task_index=index, task_name=f"task-{index}", model=model, train_examples=examples,
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


def run_child(name: str, steps: int, warmup: int) -> dict:
    """In its own (fresh) process: one throughput run, tokens/s and minor page faults per step."""
    tokenizer, examples, model = setup()
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
    return {**throughput(stamps, warmup, SETTINGS), "minor_faults_per_step": statistics.median(b - a for a, b in zip(after, after[1:]))}


def measure_rss(steps: int, threads: int, quick: bool) -> list[dict]:
    rows = []
    for kind, names in (("tuning", ["full", "attn-proj"] if quick else TUNING_METHODS), ("cl", ["lwf"] if quick else CL_METHODS)):
        for name in names:
            try:
                rows.append(child("bench.engine_real", "--rss-child", kind, name, "--rss-steps", str(steps), "--threads", str(threads)))
            except RuntimeError as error:
                rows.append({"kind": kind, "method": name, "error": str(error).strip().splitlines()[-1]})
            print(f"memory {kind:6s} {name:12s} {rows[-1].get('training_peak_above_baseline_mib', rows[-1].get('error'))}", flush=True)
    return rows


# what each ratio (of tokens per wall-second) divides by what
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


def markdown(report: dict) -> str:
    settings, median = report["settings"], {k: v["median"] for k, v in report["tokens_per_s"].items()}
    load = report["load_average_1min"]
    lines = [
        "## Training engine", "",
        f"Command: `{report['command']}` (measured {report['measured_at']}).", "",
        f"Machine: {machine_line(report['machine'])}",
        load_note(load["before"], load["after"], report["machine"]["logical_cores"]), "",
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
    rss = report.get("peak_rss") or []
    if rss:
        lines += [
            "",
            f"### Peak resident memory ({rss[0].get('steps', '?')} engine steps, bf16 autocast, one fresh process each)", "",
            "Above the process's resident size before the model is built; a CL method's row is its second task "
            "(EWC holds the first task's Fisher, LwF and SEEKR a frozen teacher, averaging the previous weights). "
            "Replay has no plugin state: its cost is the replayed examples, not a model-sized tensor.", "",
            table(["kind", "method", "tuning", "trainable params", "training peak above pre-model RSS (MiB)"],
                  [[row["kind"], row["method"], row.get("tuning", ""), row.get("trainable_params", ""),
                    row.get("error") or ("n/a" if row["training_peak_above_baseline_mib"] is None else f"{row['training_peak_above_baseline_mib']:.0f}")]
                   for row in rss]),
        ]
    if report.get("reading"):
        lines += ["", report["reading"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["smollm2"], default="smollm2", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (warm-up included)")
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded from the timing")
    parser.add_argument("--rounds", type=int, default=2, help="rotated rounds of the six main runs; median reported")
    parser.add_argument("--rss-steps", type=int, default=3, help="engine steps per memory run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 1 warm-up, 1 round, the engine runs and two memory rows")
    parser.add_argument("--rss-child", nargs=2, metavar=("KIND", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--run-child", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS, help="the JSON report; the .md goes beside it")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the existing --output JSON")
    args = parser.parse_args(argv)
    if args.render:
        args.output.with_suffix(".md").write_text(markdown(json.loads(args.output.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    if args.rss_child or args.run_child:
        print(json.dumps(rss_child(*args.rss_child, args.rss_steps) if args.rss_child else run_child(args.run_child, args.steps, args.warmup)))
        return 0
    names = list(RUNS)
    if args.quick:
        args.steps, args.warmup, args.rounds, args.rss_steps = 3, 1, 1, 2
        names = ["engine bf16", "engine fp32"]
    load_before = os.getloadavg()
    runs, median = rotated_rounds([name for name in ROTATED if name in names], [name for name in names if name not in ROTATED], args.rounds,
                                  lambda name: child("bench.engine_real", "--run-child", name, "--steps", str(args.steps),
                                                     "--warmup", str(args.warmup), "--threads", str(args.threads)))
    load_after = os.getloadavg()
    report = {
        "command": command("bench.engine_throughput", argv),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "settings": {"model": MODEL, "steps": args.steps, "warmup_steps_excluded": args.warmup, "rounds": args.rounds,
                     "batch": SETTINGS.batch, "block": SETTINGS.block, "lr": SETTINGS.lr, "threads": args.threads, "process_per_run": True,
                     "trainer_optim": "adamw_torch", "attn_implementation": "eager"},
        "tokens_per_s": {name: {"tuning": RUNS[name][0], "median": median[name], "runs": runs[name]} for name in names},
        "ratios": {key: median[a]["wall"] / median[b]["wall"] if a in median and b in median else None for key, (a, b) in RATIOS.items()},
        "peak_rss": measure_rss(args.rss_steps, args.threads, args.quick),
    }
    text = markdown(report)
    print(text)
    json_path, md_path = write_results(args.output.stem, report, text, args.output.parent)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
