"""On a CUDA device, in one command: training throughput and MFU, the test suite, and the CL quality run at size.

    python -m bench.gpu [--budget-minutes 12] [--sections throughput tests cl] [--output-dir bench/results]
    python -m bench.gpu --dry-run     # the same code paths on the CPU in seconds: tiny sizes, a few steps

Throughput: a ~110M Llama and SmolLM2-135M's shape (random weights, from tests/tiny_models.py's factory: the speed
does not depend on the values), bf16 autocast, sdpa attention, random token blocks; Perennial's engine against a
plain loop and transformers.Trainer (bench/engine_throughput.py's runners), the first two also under torch.compile.
MFU = model FLOP/s (engine_throughput.flops_per_token: 6·N + 12·layers·seq·d a token) over the device's dense bf16
peak from PEAK_TFLOPS, or over its measured matmul peak (bf16, 8192³) where the name is not in the table. Tests:
`pytest -m "not slow"` in a subprocess, every failure and error recorded. CL quality: bench.cl_quality's standard
order (full, attn-proj, replay-10%, seekr-1%, seed 0) as cl_quality_gpu, in the budget left (rerun, it resumes).
Each section has its share of --budget-minutes (time one leaves goes to the next); one that fails records its error
and the next runs; the JSON is written after each. --sections reruns some and keeps the others' results.
Results: <output-dir>/gpu.json, gpu.md and gpu_tests.log (and cl_quality_gpu.*); into bench/results, BENCHMARKS.md
is assembled again (`python -m bench.report`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from app.services import stop_process_group
from bench import engine_throughput as et
from bench.common import RESULTS_DIR, ROOT, machine, report_head, section_head, table, write_results

MODULE = "bench.gpu"
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s, by a part of the device's name;
# the longest part found wins ("H100 PCIe" over "H100", "L40S" over "L4").
PEAK_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H800": 989, "H200": 989, "B200": 2250, "A100": 312,
               "A800": 312, "L40S": 362, "L40": 181, "L4": 121}
MFU_TARGET = 0.45  # for the ~110M Llama (issue #48)
LLAMA_110M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                  max_position_embeddings=2048, tie_word_embeddings=True)
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0)
# name -> (vocabulary, sizes, blocks a step: SmolLM2's 49k-token vocabulary makes its logits the larger)
MODELS = {"llama-110m": (32768, LLAMA_110M, 32), "smollm2-135m": (49152, SMOLLM2_SHAPE, 16)}
# run -> its loop from bench/engine_throughput.py, given the settings and the torch.compile backend
RUNNERS = {
    "engine + torch.compile": lambda settings, backend: et.engine_loop(settings, "bf16", compiled=backend),
    "engine": lambda settings, backend: et.engine_loop(settings, "bf16"),
    "plain + torch.compile": lambda settings, backend: et.plain_loop(settings, "bf16", compiled=backend),
    "plain": lambda settings, backend: et.plain_loop(settings, "bf16"),
    "Trainer": lambda settings, backend: et.trainer_loop(settings, "bf16"),
}
REAL = {"block": 1024, "steps": 12, "warmup": 4, "backend": "inductor"}
DRY = {"batch": 2, "block": 16, "steps": 3, "warmup": 1, "backend": "eager"}  # dynamo's tracing, no code generation
CL_METHODS = ["full", "attn-proj", "replay-10%", "seekr-1%"]
CL_SET = ["eval.batch_size=64"]  # scoring batches a GPU fills; the benchmark's training settings unchanged
SHARES = {"throughput": 0.3, "tests": 0.35, "cl": 0.35}  # of --budget-minutes


def build(name: str, dry: bool) -> torch.nn.Module:
    """The model `name` of MODELS with random weights (fp32 master weights); --dry-run: the factory's tiny Llama."""
    from tests.tiny_models import tiny_model

    vocab, sizes, _ = MODELS[name]
    return tiny_model("llama", vocab_size=64 if dry else vocab, attn_implementation="sdpa", **({} if dry else sizes))


def datasheet_tflops(name: str) -> float | None:
    return next((PEAK_TFLOPS[part] for part in sorted(PEAK_TFLOPS, key=len, reverse=True) if part in name), None)


def device_peak(device: torch.device) -> dict:
    """The device's name, its data-sheet bf16 peak if PEAK_TFLOPS knows it, and its measured square bf16 matmul rate."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({machine()['cpu_model']})"
    known = datasheet_tflops(name)
    size = 8192 if device.type == "cuda" else 256
    measured = et.gemm_rates({(size, size): [1, 1]}, size, torch.bfloat16, str(device), min_seconds=0.1)["peak_gflops"] / 1000
    return {"name": name, "datasheet_tflops": known, "measured_matmul_tflops": measured, "mfu_basis_tflops": known or measured,
            "mfu_basis": "data sheet" if known else f"measured {size}³ bf16 matmul"}


def measure_run(model_name: str, run: str, device: torch.device, sizes: dict, dry: bool) -> dict:
    model = build(model_name, dry)
    settings = et.LoopSettings(batch=sizes.get("batch") or MODELS[model_name][2], block=sizes["block"], lr=1e-4, device=str(device))
    blocks = torch.randint(model.config.vocab_size, (4 * settings.batch, settings.block), generator=torch.Generator().manual_seed(0))
    flops = et.flops_per_token(model, settings.block)["total"]
    params = sum(p.numel() for p in model.parameters())
    clock = (lambda: (torch.cuda.synchronize(device), et.stamp())[1]) if device.type == "cuda" else et.stamp
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps = RUNNERS[run](settings, sizes["backend"])(model, [{"input_ids": row.tolist()} for row in blocks], 0, sizes["steps"], clock)
    tokens_per_s = et.throughput(stamps, sizes["warmup"], settings)["wall"]
    return {"params": params, "batch": settings.batch, "block": settings.block, "gflop_per_token": flops / 1e9, "tokens_per_s": tokens_per_s,
            "model_tflops": tokens_per_s * flops / 1e12, "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def throughput(device: torch.device, dry: bool, deadline: float) -> dict:
    sizes, peak, rows = DRY if dry else REAL, device_peak(device), []
    for model_name in MODELS:
        for run in RUNNERS:
            row = {"model": model_name, "run": run}
            if time.monotonic() > deadline:
                rows.append({**row, "skipped": "the section's share of --budget-minutes was spent"})
                continue
            try:
                row.update(measure_run(model_name, run, device, sizes, dry))
                row["mfu"] = row["model_tflops"] / peak["mfu_basis_tflops"]
            except Exception as error:  # noqa: BLE001 - one run failing (out of memory, a compile error) is a row
                row["error"] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
            rows.append(row)
            print(f"throughput {model_name} {run}: {row}", flush=True)
            torch._dynamo.reset(), gc.collect()  # the compiled graphs hold the last model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"device": peak, "settings": {k: sizes[k] for k in ("block", "steps", "warmup")}, "compile_backend": sizes["backend"],
            "precision": "bf16 autocast, fp32 master weights", "attn_implementation": "sdpa", "runs": rows}


def run_logged(command: list[str], log: Path, seconds: float, **env: str) -> tuple[int | None, float]:
    """`command` in its own process group, its output into `log`; (exit status, or None when stopped at `seconds`; wall s)."""
    started = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **env})
        try:
            return process.wait(timeout=max(1.0, seconds)), time.monotonic() - started
        except subprocess.TimeoutExpired:
            stop_process_group(process)
            return None, time.monotonic() - started


OUTCOME = re.compile(r"^(?:\[gw\d+\] \[\s*\d+%\] )?(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/\S.*?)(?: - (.*))?$|"
                     r"^(tests/\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def parse_pytest(text: str) -> dict:
    """Each test's outcome from `pytest -v -rfE` output (with or without xdist), the messages of the short summary."""
    outcomes, messages = {}, {}
    for line in text.splitlines():
        if found := OUTCOME.match(line.strip()):
            outcome, test, message = (found[1], found[2], found[3]) if found[1] else (found[5], found[4], None)
            outcomes[test] = outcome
            if message:
                messages[test] = message[:500]
    counts = {outcome: sum(value == outcome for value in outcomes.values()) for outcome in sorted(set(outcomes.values()))}
    return {"counts": counts, "failures": [{"test": test, "outcome": outcome, "message": messages.get(test, "")}
                                           for test, outcome in outcomes.items() if outcome in ("FAILED", "ERROR")]}


def tests(output_dir: Path, dry: bool, deadline: float) -> dict:
    selection = ["tests/test_engine.py", "-k", "stream_indices", "-n", "0"] if dry else ["-n", "8", "--dist", "loadfile"]
    command = [sys.executable, "-m", "pytest", "-m", "not slow", "-v", "-rfE", "-p", "no:cacheprovider", *selection]
    # 8 workers of 2 threads on the device's 16 cores, whole files per worker (as `make test` shares out 2 cores)
    status, seconds = run_logged(command, output_dir / "gpu_tests.log", deadline - time.monotonic(), OMP_NUM_THREADS="2")
    text = (output_dir / "gpu_tests.log").read_text(errors="replace")
    summary = [line.strip("= ") for line in text.splitlines() if re.match(r"^=+ .* in [\d.]+s", line)]
    return {"command": shlex.join(["python", *command[1:]]), "exit_status": status, "timed_out": status is None, "minutes": seconds / 60,
            "summary": summary[-1] if summary else None, **parse_pytest(text), "log": "gpu_tests.log"}


def cl(output_dir: Path, dry: bool, deadline: float) -> dict:
    command = [sys.executable, "-m", "bench.cl_quality", "--methods", *CL_METHODS, "--seeds", "0", "--name", "cl_quality_gpu",
               "--output-dir", str(output_dir), "--set", *CL_SET]
    if dry:  # services and minutes: argparse checks the arguments (methods among the recipes) before --help exits
        status, _ = run_logged([*command, "--help"], output_dir / "gpu_cl.log", deadline - time.monotonic())
        return {"command": shlex.join(["python", *command[1:]]), "dry_run": "arguments checked (exit status of --help after them: "
                f"{status}), not run: the CL run needs its services and minutes", "exit_status": status}
    status, seconds = run_logged(command, output_dir / "gpu_cl.log", deadline - time.monotonic())
    tail = (output_dir / "gpu_cl.log").read_text(errors="replace").splitlines()[-15:]
    return {"command": shlex.join(["python", *command[1:]]), "exit_status": status, "timed_out": status is None, "minutes": seconds / 60,
            "results": "cl_quality_gpu.json" if (output_dir / "cl_quality_gpu.json").exists() else None, "log_tail": tail if status else []}


SECTIONS = {"throughput": lambda out, dry, deadline: throughput(torch.device("cpu" if dry else "cuda"), dry, deadline),
            "tests": tests, "cl": cl}


def markdown(report: dict) -> str:
    """BENCHMARKS.md's `## GPU`, from gpu.json."""
    sections, dry = report["sections"], report.get("dry_run")
    lines = [*section_head("GPU" + (" (dry run on the CPU: tiny sizes, no measurement)" if dry else ""), report)]
    if "error" not in (speed := sections.get("throughput", {"error": "not run"})):
        device, settings = speed["device"], speed["settings"]
        basis = f"{device['mfu_basis_tflops']:.4g} TFLOP/s ({device['mfu_basis']})"
        lines += [f"Device: {device['name']}; dense bf16 peak {basis}; measured bf16 matmul {device['measured_matmul_tflops']:.4g} TFLOP/s.", "",
                  "### Training throughput and MFU", "",
                  f"{speed['precision']}, {speed['attn_implementation']} attention, random blocks of {settings['block']} tokens (the "
                  f"batch column: blocks a step), {settings['steps']} steps of which the first {settings['warmup']} are excluded (tokens/s at the median step); "
                  f"torch.compile backend {speed['compile_backend']}. Model FLOPs as in the Training engine section (6·N + attention a "
                  f"token); MFU over {basis}.", "",
                  table(["model", "run", "params", "batch", "tokens/s", "model TFLOP/s", "MFU", "peak GPU memory (GiB)"],
                        [[r["model"], r["run"], *([r.get("skipped") or r["error"], "", "", "", "", ""] if "tokens_per_s" not in r else [
                            f"{r['params']:,}", r["batch"], f"{r['tokens_per_s']:,.0f}", f"{r['model_tflops']:.4g}", f"{r['mfu']:.1%}",
                            "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"])] for r in speed["runs"]])]
        best = max((r for r in speed["runs"] if r["model"] == "llama-110m" and "mfu" in r), key=lambda r: r["mfu"], default=None)
        lines += ["", f"MFU target >= {MFU_TARGET:.0%} for the ~110M Llama: " + ("not measured" if best is None else
                  f"best {best['mfu']:.1%} ({best['run']}): {'met' if best['mfu'] >= MFU_TARGET else 'NOT met'}.")]
    else:
        lines += [f"Throughput: {speed['error']}"]
    suite = sections.get("tests", {"error": "not run"})
    lines += ["", "### Test suite on the device" + (f" (`{suite['command']}`)" if "command" in suite else ""), ""]
    if "error" in suite:
        lines += [suite["error"]]
    else:
        lines += [f"{suite['summary'] or 'no summary'}{' (stopped at its budget)' if suite['timed_out'] else ''}; "
                  + ", ".join(f"{count} {outcome.lower()}" for outcome, count in suite["counts"].items()) + f"; {suite['minutes']:.1f} min."]
        if suite["failures"]:
            lines += ["", table(["test", "outcome", "message"], [[f["test"], f["outcome"], f["message"].replace("|", "\\|")] for f in suite["failures"]])]
    quality = sections.get("cl", {"error": "not run"})
    lines += ["", "### CL quality at size", "", quality.get("error") or quality.get("dry_run") or (
        f"`{quality['command']}`: " + ("stopped at its budget after" if quality["timed_out"] else f"exit status {quality['exit_status']} after")
        + f" {quality['minutes']:.1f} min; " + ("its table is the section cl_quality_gpu." if quality["results"] else "no table written."))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-minutes", type=float, default=12.0, help="the whole script's time, shared out between the sections")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), help="run these (default: all)")
    parser.add_argument("--output-dir", type=Path, help="where gpu.json and the rest go (default bench/results; --dry-run bench/results/quick)")
    parser.add_argument("--dry-run", action="store_true", help="the same code paths on the CPU: tiny sizes, a few steps, one test")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run it on one, or --dry-run")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):  # as the Makefile runs everything
        os.environ.setdefault(name, "1")
    output_dir = (args.output_dir or (RESULTS_DIR / "quick" if args.dry_run else RESULTS_DIR)).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    earlier = json.loads((output_dir / "gpu.json").read_text()).get("sections", {}) if (output_dir / "gpu.json").exists() else {}
    load, started = os.getloadavg()[0], time.monotonic()
    sections, share = dict(earlier), 0.0
    for name in args.sections:
        share += SHARES[name] / sum(SHARES[n] for n in args.sections)
        began = time.monotonic()
        try:
            sections[name] = SECTIONS[name](output_dir, args.dry_run, started + share * args.budget_minutes * 60)
        except Exception:  # noqa: BLE001 - a failing section is recorded and the next one runs
            sections[name] = {"error": traceback.format_exc().strip().splitlines()[-1]}
        sections[name].update(measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), section_minutes=(time.monotonic() - began) / 60)
        report = {**report_head(MODULE, argv, load), "dry_run": args.dry_run, "budget_minutes": args.budget_minutes, "sections": sections}
        write_results("gpu", report, markdown(report), output_dir)
    if output_dir == RESULTS_DIR.resolve():
        from bench import report as assemble

        assemble.main([])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
