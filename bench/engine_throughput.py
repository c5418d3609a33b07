"""Training throughput of Perennial's engine against a plain PyTorch loop and transformers.Trainer.

    python -m bench.engine_throughput [--model smollm2|tiny] [--steps N] [--warmup W] [--rounds R] [--quick]

--model smollm2 (the default) is bench/engine_real.py: SmolLM2-135M-Instruct, the embedded default model.
--model tiny: all three loops (bench/loops.py) train the demo-size tiny Llama from the same initial weights on the
demo general corpus, packed into 128-token blocks, 16 a step, in fp32 (a comparison of loops, not of precisions),
in rotated order for R rounds (medians); tokens/s from warm-up step W to the last step. Then, in a fresh
subprocess per tuning method, the peak resident memory of a short engine run: ru_maxrss (the process's lifetime
peak) and the high-water mark while training above the resident size before the model is built.

Timings default to one thread (--threads): on a busy shared machine a second OpenMP thread that loses its core
stalls every parallel region. Results: bench/results/engine_throughput_tiny.json and .md; `--render` rewrites the
.md from the JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.common import command, load_note, machine, machine_line, table, write_results
from bench.loops import LoopSettings, _peak_rss_kib, _reset_peak_rss, child, engine_loop, plain_loop, rotated_rounds, throughput, trainer_loop
from models.data import pack_texts
from models.engine import train
from models.tiny import build_tiny_llama, train_tokenizer
from perennial.config import DemoDataConfig, TinyModelConfig, TuningConfig
from perennial.demo_data import general_corpus

RESULTS_TINY = Path(__file__).parent / "results" / "engine_throughput_tiny.json"
SETTINGS = LoopSettings(batch=16, block=128, lr=3e-3, seed=0)
METHODS = {"engine": engine_loop(SETTINGS), "plain": plain_loop(SETTINGS), "trainer": trainer_loop(SETTINGS)}
TUNING_METHODS = ["full", "lora", "mora", "attn-proj", "mlp-gate-up"]
QUICK_RSS_METHODS = ["full", "lora"]  # a subprocess each, and most of a child's time is importing torch


def demo_setup():
    """Tokenizer, packed blocks and a freshly initialised demo-size model, all deterministic."""
    demo = DemoDataConfig()
    texts = general_corpus(demo.general_docs, demo.seed)
    tokenizer = train_tokenizer(texts, TinyModelConfig().vocab_size)
    blocks = [{"input_ids": block} for block in pack_texts(tokenizer, texts, SETTINGS.block) if len(block) == SETTINGS.block]
    torch.manual_seed(SETTINGS.seed)
    return tokenizer, blocks, build_tiny_llama(tokenizer, TinyModelConfig())


def rss_child(method: str, steps: int) -> dict:
    """In its own process: a short engine run under one tuning method, the model built after the baseline reading."""
    from models.tuning import apply_tuning, count_parameters

    tokenizer, examples, _ = demo_setup()  # the model is built again after the baseline, so its weights count as training memory
    reset = _reset_peak_rss()
    baseline = _peak_rss_kib()  # the high-water mark just reset: the resident size now
    torch.manual_seed(SETTINGS.seed)
    model = apply_tuning(build_tiny_llama(tokenizer, TinyModelConfig()), TuningConfig(method=method))
    trainable, total = count_parameters(model)
    result = train(model, examples, SETTINGS.optim_config(steps), seed=SETTINGS.seed, pad_token_id=tokenizer.pad_token_id,
                   device=torch.device("cpu"))
    return {
        "method": method, "trainable_params": trainable, "total_params": total,
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
        "rss_before_model_mib": round(baseline / 1024, 1),
        "training_peak_above_baseline_mib": round((_peak_rss_kib() - baseline) / 1024, 1) if reset else None,
        "tokens_per_s_whole_run": round(result.tokens_per_second, 1), "steps": steps,
    }


def markdown(report: dict) -> str:
    """The `## Training engine: the tiny model` section of BENCHMARKS.md, from the numbers in the JSON report."""
    settings, median, ratios = report["settings"], {k: v["median"] for k, v in report["tokens_per_s"].items()}, report["ratios"]
    load = report["load_average_1min"]
    lines = [
        "## Training engine: the tiny model", "",
        f"Command: `{report['command']}` (measured {report['measured_at']}).", "",
        f"Machine: {machine_line(report['machine'])}",
        load_note(load["before"], load["after"], report["machine"]["logical_cores"]), "",
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
        print(json.dumps(rss_child(args.rss_child, args.steps)))
        return 0
    if args.quick:
        args.steps, args.warmup, args.rounds, args.rss_steps = 8, 2, 1, 2
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")

    load_before = os.getloadavg()
    tokenizer, examples, init = demo_setup()

    def measure(name: str) -> dict:  # from the same initial weights every time
        stamps = METHODS[name](copy.deepcopy(init), examples, tokenizer.pad_token_id, args.steps)
        assert len(stamps) == args.steps, f"{name} ran {len(stamps)} steps, not {args.steps}"
        return throughput(stamps, args.warmup, SETTINGS)

    runs, median = rotated_rounds(list(METHODS), [], args.rounds, measure)
    clocks = ("cpu", "wall", "wall_window")
    ratios = {clock: {f"engine/{other}": median["engine"][clock] / median[other][clock] for other in ("plain", "trainer")} for clock in clocks}
    load_after = os.getloadavg()
    rss = [child("bench.engine_throughput", "--model", "tiny", "--rss-child", method, "--steps", str(args.rss_steps), "--threads", str(args.threads))
           for method in (QUICK_RSS_METHODS if args.quick else TUNING_METHODS)]
    report = {
        "command": command("bench.engine_throughput", argv),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "settings": {"steps": args.steps, "warmup_steps_excluded": args.warmup, "rounds": args.rounds, "batch": SETTINGS.batch,
                     "block": SETTINGS.block, "examples": len(examples), "model": TinyModelConfig().model_dump(), "lr": SETTINGS.lr,
                     "trainer_optim": "adamw_torch", "attn_implementation": "eager", "device": "cpu", "threads": args.threads},
        "tokens_per_s": {name: {"median": median[name], "runs": runs[name]} for name in METHODS},
        "clocks": {"cpu": "tokens per CPU-second of the training process at the median step (headline)",
                   "wall": "tokens per wall-clock second at the median step",
                   "wall_window": "tokens per wall-clock second over all timed steps, stalls included"},
        "ratios": ratios,
        "peak_rss_by_tuning": rss,
    }
    text = markdown(report)
    print(text)
    json_path, md_path = write_results(args.output.stem, report, text, args.output.parent)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
