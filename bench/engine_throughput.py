"""Training throughput of Perennial's engine against a plain PyTorch loop and transformers.Trainer.

    python -m bench.engine_throughput [--model smollm2|tiny] [--steps N] [--warmup W] [--rounds R] [--quick]

--model smollm2 (the default; bench/engine_real.py): SmolLM2-135M-Instruct, the embedded default
model, in bf16 autocast and in fp32, with the options that might close the gap to bf16's 2x
ceiling, and peak memory per tuning method and per CL method.

--model tiny: all three train the demo-size tiny Llama (vocab 512, hidden 128, intermediate 352, 4 layers,
4 heads) from the same initial weights on the demo general corpus packed into 128-token
blocks, 16 blocks a step, AdamW, the same number of steps. Each method records a timestamp
after every optimizer step; tokens/s is measured from the end of warm-up step W to the last
step, so start-up (Trainer construction, first-call allocation) is excluded. The methods run
in rotated order for R rounds and the median is reported, so a burst of load from other
processes does not land on one method only.

Then, in a fresh subprocess per tuning method (so one method's allocations do not inflate the
next), the peak resident memory of a short engine run: getrusage's ru_maxrss (the process's
lifetime peak, which for this small a model is set by importing torch and transformers) and the
peak while training above the resident size just before the model is built (Linux: the
high-water mark is reset through /proc/self/clear_refs, then read from /proc/self/status).

Timings default to one thread (--threads): on a busy shared machine a second OpenMP thread
that loses its core stalls every parallel region, and step times swing tenfold.

Results: a table on stdout, bench/results/engine_throughput.json (every number) and
bench/results/engine_throughput.md (the `## Training engine` section of BENCHMARKS.md);
`--render` rewrites the .md from an existing .json without measuring again.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.common import command, load_note, machine, machine_line, table, write_results
from bench.loops import LoopSettings, engine_loop, plain_loop, reset_peak_rss, status_kib, throughput, trainer_loop
from models.data import pack_texts
from models.engine import train
from models.tiny import build_tiny_llama, train_tokenizer
from perennial.config import DemoDataConfig, TinyModelConfig, TuningConfig
from perennial.demo_data import general_corpus

RESULTS = Path(__file__).parent / "results" / "engine_throughput.json"
RESULTS_TINY = Path(__file__).parent / "results" / "engine_throughput_tiny.json"
BLOCK = 128
BATCH = 16
LR = 3e-3
SEED = 0
TUNING_METHODS = ["full", "lora", "mora", "attn-proj", "mlp-gate-up"]
QUICK_RSS_METHODS = ["full", "lora"]  # a subprocess each, and most of a child's time is importing torch


# --- shared setup -----------------------------------------------------------------------------


def demo_setup():
    """Tokenizer, packed blocks and a freshly initialised demo-size model, all deterministic."""
    demo = DemoDataConfig()
    texts = general_corpus(demo.general_docs, demo.seed)
    tiny = TinyModelConfig()
    tokenizer = train_tokenizer(texts, tiny.vocab_size)
    blocks = [block for block in pack_texts(tokenizer, texts, BLOCK) if len(block) == BLOCK]
    torch.manual_seed(SEED)
    model = build_tiny_llama(tokenizer, tiny)
    return tokenizer, [{"input_ids": block} for block in blocks], model


SETTINGS = LoopSettings(batch=BATCH, block=BLOCK, lr=LR, seed=SEED)
# fp32 throughout: the tiny model's comparison is of the loops, not of precisions
METHODS = {"engine": engine_loop(SETTINGS), "plain": plain_loop(SETTINGS), "trainer": trainer_loop(SETTINGS)}


# --- peak memory per tuning method (one subprocess each) ------------------------------------------


def rss_child(method: str, steps: int) -> None:
    """Runs in its own process: a short engine run under one tuning method; prints a JSON line."""
    from models.tuning import apply_tuning, count_parameters

    tokenizer, examples, model = demo_setup()
    del model  # built again below, after the baseline, so its weights count as training memory
    reset = reset_peak_rss()
    baseline = status_kib("VmRSS")
    torch.manual_seed(SEED)
    model = apply_tuning(build_tiny_llama(tokenizer, TinyModelConfig()), TuningConfig(method=method))
    trainable, total = count_parameters(model)
    result = train(model, examples, SETTINGS.optim_config(steps), seed=SEED, pad_token_id=tokenizer.pad_token_id,
                   device=torch.device("cpu"))
    lifetime_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({
        "method": method, "trainable_params": trainable, "total_params": total,
        "ru_maxrss_mib": round(lifetime_peak / 1024, 1), "rss_before_model_mib": round(baseline / 1024, 1),
        "training_peak_above_baseline_mib": round((status_kib("VmHWM") - baseline) / 1024, 1) if reset else None,
        "tokens_per_s_whole_run": round(result.tokens_per_second, 1), "steps": steps,
    }))


def measure_rss(steps: int, threads: int, methods: list[str] = TUNING_METHODS) -> list[dict]:
    rows = []
    for method in methods:
        done = subprocess.run(
            [sys.executable, "-m", "bench.engine_throughput", "--model", "tiny", "--rss-child", method, "--steps", str(steps),
             "--threads", str(threads)],
            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


# --- reporting ------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    """The `## Training engine` section of BENCHMARKS.md, from the numbers in the JSON report."""
    settings, median, ratios = report["settings"], {k: v["median"] for k, v in report["tokens_per_s"].items()}, report["ratios"]
    load = report["load_average_1min"]
    lines = [
        "## Training engine: the tiny model",
        "",
        f"Command: `{report['command']}` (measured {report['measured_at']}).",
        "",
        f"Machine: {machine_line(report['machine'])}",
        load_note(load["before"], load["after"], report["machine"]["logical_cores"]),
        "",
        f"The demo-size tiny Llama (hidden {settings['model']['hidden_size']}, {settings['model']['num_hidden_layers']} layers) on the demo general "
        f"corpus, {settings['batch']} blocks of {settings['block']} tokens a step, AdamW, {settings['steps']} steps of which "
        f"the first {settings['warmup_steps_excluded']} are excluded, {settings['threads']} torch thread(s), {settings['device']}; "
        f"median over {settings['rounds']} rounds in rotated order.",
        "",
        "### Throughput (tokens/s)",
        "",
        table(["method", "per CPU-second (headline)", "per wall-second", "wall, whole window (stalls included)"],
              [[name, f"{m['cpu']:.0f}", f"{m['wall']:.0f}", f"{m['wall_window']:.0f}"] for name, m in median.items()]),
        "",
        table(["ratio", "CPU-second", "wall-second", "whole window", "target >= 0.95 (CPU-second)"],
              [[key, *(f"{ratios[clock][key]:.3f}" for clock in ("cpu", "wall", "wall_window")),
                "met" if ratios["cpu"][key] >= 0.95 else "NOT met"] for key in ("engine/plain", "engine/trainer")]),
        "",
        f"Reading: the engine trains at {ratios['cpu']['engine/plain']:.2f}x the tokens/s of a plain PyTorch loop and "
        f"{ratios['cpu']['engine/trainer']:.2f}x that of transformers.Trainer on the same model, data and batch.",
    ]
    rss = report.get("peak_rss_by_tuning") or []
    if rss:
        lines += [
            "",
            f"### Peak resident memory by tuning method ({rss[0]['steps']} engine steps, one fresh process each)",
            "",
            table(["tuning", "trainable params", "ru_maxrss MiB (process lifetime)", "training peak above pre-model RSS MiB",
                   "tokens/s (whole run)"],
                  [[row["method"], row["trainable_params"], f"{row['ru_maxrss_mib']:.1f}",
                    "n/a" if row["training_peak_above_baseline_mib"] is None else f"{row['training_peak_above_baseline_mib']:.1f}",
                    f"{row['tokens_per_s_whole_run']:.0f}"] for row in rss]),
            "",
            f"Reading: about {min(r['rss_before_model_mib'] for r in rss):.0f} MiB are resident before the model is built "
            "(torch, transformers, tokenizer, data); training then adds "
            + ", ".join(f"{r['method']} {r['training_peak_above_baseline_mib']:.0f}" for r in rss
                        if r["training_peak_above_baseline_mib"] is not None) + " MiB at its peak.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    which = argparse.ArgumentParser(add_help=False)
    which.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    if which.parse_known_args(argv)[0].model == "smollm2":
        from bench.engine_real import main as real_model_main

        return real_model_main(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny"], required=True, help="tiny: the toy Llama (smollm2: bench/engine_real.py)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (warm-up included)")
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing")
    parser.add_argument("--rounds", type=int, default=3, help="rotated rounds of the three methods; median reported")
    parser.add_argument("--rss-steps", type=int, default=10, help="engine steps per tuning-method memory run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every method (see above)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 steps, 2 warm-up, 1 round; memory of full and lora only, 2 steps")
    parser.add_argument("--no-rss", action="store_true", help="skip the per-tuning-method memory runs")
    parser.add_argument("--rss-child", choices=TUNING_METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS_TINY, help="the JSON report; the .md goes beside it")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the existing --output JSON")
    args = parser.parse_args(argv)
    if args.render:
        args.output.with_suffix(".md").write_text(markdown(json.loads(args.output.read_text())))
        print(f"wrote {args.output.with_suffix('.md')}")
        return 0
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.rss_child, args.steps)
        return 0
    if args.quick:
        args.steps, args.warmup, args.rounds, args.rss_steps = 8, 2, 1, 2
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")

    load_before = os.getloadavg()
    tokenizer, examples, init = demo_setup()
    names = list(METHODS)
    clocks = ("cpu", "wall", "wall_window")
    runs = {name: {clock: [] for clock in clocks} for name in names}
    for round_index in range(args.rounds):
        for name in names[round_index % 3:] + names[: round_index % 3]:  # rotate who goes first
            model = copy.deepcopy(init)  # the same initial weights for every run
            stamps = METHODS[name](model, examples, tokenizer.pad_token_id, args.steps)
            assert len(stamps) == args.steps, f"{name} ran {len(stamps)} steps, not {args.steps}"
            for clock, value in throughput(stamps, args.warmup, SETTINGS).items():
                runs[name][clock].append(value)
            print(f"round {round_index + 1}/{args.rounds} {name:8s} cpu {runs[name]['cpu'][-1]:7.0f}  "
                  f"wall {runs[name]['wall'][-1]:7.0f} tokens/s", flush=True)
    median = {name: {clock: statistics.median(runs[name][clock]) for clock in clocks} for name in names}
    ratios = {clock: {"engine/plain": median["engine"][clock] / median["plain"][clock],
                      "engine/trainer": median["engine"][clock] / median["trainer"][clock]} for clock in clocks}
    load_after = os.getloadavg()

    rss = [] if args.no_rss else measure_rss(args.rss_steps, args.threads, QUICK_RSS_METHODS if args.quick else TUNING_METHODS)

    print(f"\ntokens/s, median over {args.rounds} rounds of each run's median step ({args.threads} thread(s))")
    print(f"{'method':10s} {'per CPU-second':>15s} {'per wall-second':>16s} {'wall, whole window':>19s}")
    for name in names:
        print(f"{name:10s} {median[name]['cpu']:15.0f} {median[name]['wall']:16.0f} {median[name]['wall_window']:19.0f}")
    for key in ("engine/plain", "engine/trainer"):
        values = [ratios[clock][key] for clock in clocks]
        verdict = "ok" if ratios["cpu"][key] >= 0.95 else "BELOW 0.95"
        print(f"{key:15s} {values[0]:15.3f} {values[1]:16.3f} {values[2]:19.3f}  {verdict} (CPU-time)")
    if rss:
        print(f"\n{'tuning':12s} {'trainable':>10s} {'ru_maxrss MiB':>14s} {'training peak above baseline MiB':>33s}")
        for row in rss:
            above = row["training_peak_above_baseline_mib"]
            print(f"{row['method']:12s} {row['trainable_params']:10d} {row['ru_maxrss_mib']:14.1f} {above if above is not None else 'n/a':>33}")
    print(f"load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} cores")

    report = {
        "command": command("bench.engine_throughput", argv if argv is not None else sys.argv[1:]),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "settings": {"steps": args.steps, "warmup_steps_excluded": args.warmup, "rounds": args.rounds, "batch": BATCH,
                     "block": BLOCK, "examples": len(examples), "model": TinyModelConfig().model_dump(), "lr": LR,
                     "trainer_optim": "adamw_torch", "attn_implementation": "eager", "device": "cpu",
                     "threads": args.threads},
        "tokens_per_s": {name: {"median": median[name], "runs": runs[name]} for name in names},
        "clocks": {"cpu": "tokens per CPU-second of the training process at the median step (headline)",
                   "wall": "tokens per wall-clock second at the median step",
                   "wall_window": "tokens per wall-clock second over all timed steps, stalls included"},
        "ratios": ratios,
        "peak_rss_by_tuning": rss,
    }
    json_path, md_path = write_results(args.output.stem, report, markdown(report), args.output.parent)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
