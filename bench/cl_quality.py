"""Continual-learning quality on the standard CL benchmark: a client of `perennial compare` (flows/compare.py).

    python -m bench.cl_quality --sweep                       # learning rates first (configs/cl-benchmark-sweep.yaml)
    python -m bench.cl_quality [--methods full attn-proj ...] [--seeds 0 1 2] [--workers 1] [--quick]
                               [--order agnews dbpedia amazon] [--set KEY=VALUE ...] [--name cl_quality]
    python -m bench.cl_quality --add --methods multitask ...  # run these, keep the published JSON's other runs
    python -m bench.cl_quality --render [--sweep] [--name NAME]   # rewrite the .md (and figure) from the JSON

The benchmark is configs/cl-benchmark.yaml, the recipes of configs/cl-benchmark-methods.yaml (each method's
learning rate is its tuning method's sweep pick) and one comparison, against SeaweedFS and MLflow started here with
their data in --state-dir: started again, the comparison resumes every unfinished run from its last committed stage
and collects the finished ones. What this file adds: the services, the benchmark's wording, and the two published
orderings it checks. Results: bench/results/<name>.json, .md and _matrices.png. `--quick` is a smoke run (two
methods, one seed, a few steps, 10 test records per task, empty services).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from bench.common import RESULTS_DIR, ROOT, command
from perennial import compare
from perennial.compare import ACCURACY_RESOLUTION, PPL_LOG_RESOLUTION, fmt

BASE_CONFIG = ROOT / "configs" / "cl-benchmark.yaml"
METHODS_FILE = ROOT / "configs" / "cl-benchmark-methods.yaml"
SWEEP_FILE = ROOT / "configs" / "cl-benchmark-sweep.yaml"
DEFAULT_NAME = "cl_quality"
BUCKET = "cl-quality"  # of the benchmark's own services
QUICK_METHODS = ["full", "attn-proj"]
QUICK_OVERRIDES = ["model.pretrain.max_steps=8", "dap.optim.max_steps=2", "cit.optim.max_steps=4", "eval.general_max_docs=8",
                   "eval.probe_prompts=4", "eval.max_task_records=10"]
# The benchmark's words around the comparison's numbers.
WORDING = {"default_name": DEFAULT_NAME, "general_text": "WikiText-2", "sweep_records_note": ", which the benchmark never reads",
           "recipe_noun": "method", "recipes_file": "configs/cl-benchmark-methods.yaml",
           "description": "a short DAP on yelp review text, then {tasks} as instruction tasks scored by option log-likelihood "
                          "through the chat template", "claims_heading": "Published orderings and the best-recipe target, checked:"}


def load_methods() -> tuple[dict[str, list[str]], dict[str, list[str]], list[int]]:
    """The compared methods, the diagnostic variants (run only when named) and the default seeds."""
    spec = compare.load_spec(METHODS_FILE)
    return spec.recipes, spec.diagnostics, spec.seeds


def orderings(rows: dict[str, dict]) -> list[str]:
    """The published claims, checked on these numbers with the comparison's one margin rule."""
    lines = []
    # The seed paper's two selective tunings: attention q/k/v/o, or MLP gate and up with down frozen.
    for method, claim in (("attn-proj", "Selective attention tuning"), ("mlp-gate-up", "Tuning only MLP gate and up (down frozen)")):
        if {"full", method} <= set(rows):
            lines.append(_selective_line(rows["full"], rows[method], method, claim))
    if {"seekr-1%", "replay-10%"} <= set(rows):
        seekr, replay = rows["seekr-1%"], rows["replay-10%"]
        gap = seekr["ap"]["mean"] - replay["ap"]["mean"]
        margin = compare.margin(seekr["ap"], replay["ap"], ACCURACY_RESOLUTION)
        # "Comes close" is one-sided: SEEKR ahead, or behind by no more than the margin.
        lines.append(
            f"- SEEKR at 1% replay comes close to replay at 10%: AP {fmt(seekr['ap'])} ({compare.seeds_of(seekr)}) vs "
            f"{fmt(replay['ap'])} ({compare.seeds_of(replay)}) (gap {gap:+.3f}, margin {margin:.3f}: the larger of the summed seed "
            f"std and the test sets' resolution); BWT {fmt(seekr['bwt'], True)} vs {fmt(replay['bwt'], True)} -> "
            f"**{'holds' if gap >= -margin else 'does not hold'}** at this scale.")
    return lines + best_recipe_lines(rows)


# Issue #37's target for the best recipe: the multi-task bound less this, and the least BWT.
BOUND_SLACK, LEAST_BWT = 0.02, -0.02


def best_recipe_lines(rows: dict[str, dict]) -> list[str]:
    """The best Perennial recipe against issue #37's target, whichever way it comes out.

    The best recipe is the combination (a name joining methods with "+") with the highest mean AP. The target:
    it beats every single method on AP (the one margin rule), reaches the multi-task bound - BOUND_SLACK, has
    BWT >= LEAST_BWT, and its held-out tasks' change and WikiText-2 perplexity stay within the test sets'
    resolution of the base model (a drop of at most ACCURACY_RESOLUTION, a rise of at most PPL_LOG_RESOLUTION).
    Every method has the same steps, so the comparison is at equal training compute. [] without a combination.
    """
    bound = compare.multitask_bound(rows)
    combinations = [name for name, row in rows.items() if "+" in name and "ap" in row]
    singles = [name for name, row in rows.items() if "+" not in name and name != bound and "ap" in row]
    if not combinations or not singles:
        return []
    best = max(combinations, key=lambda name: rows[name]["ap"]["mean"])
    row = rows[best]
    unbeaten = [name for name in singles
                if compare.compare_measure(row, rows[name], "ap", True, ACCURACY_RESOLUTION)["verdict"] != "better"]
    said = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
    ahead = ", ".join(f"{name} {fmt(rows[name]['ap'])}" for name in unbeaten)
    checks = [f"beats every single method on AP: {said(not unbeaten)}" + (f" (ahead of it or too close to call: {ahead})" if unbeaten else "")]
    if bound is not None:
        floor = rows[bound]["ap"]["mean"] - BOUND_SLACK
        checks.append(f"AP >= the multi-task bound - {BOUND_SLACK} ({floor:.3f}): {said(row['ap']['mean'] >= floor)}")
    checks.append(f"BWT >= {LEAST_BWT}: {said(row['bwt']['mean'] >= LEAST_BWT)} ({fmt(row['bwt'], True)})")
    if "heldout_delta" in row:
        checks.append(f"held-out tasks' change within {ACCURACY_RESOLUTION} of the base model: "
                      f"{said(row['heldout_delta']['mean'] >= -ACCURACY_RESOLUTION)} ({fmt(row['heldout_delta'], True)})")
    ratio = math.exp(row["log_ppl_ratio"]["mean"])
    checks.append(f"WikiText-2 perplexity within {math.exp(PPL_LOG_RESOLUTION) - 1:.0%} of the base model: "
                  f"{said(row['log_ppl_ratio']['mean'] <= PPL_LOG_RESOLUTION)} (x{ratio:.2f})")
    return [f"- The best Perennial recipe (the combination with the highest AP: {best}, {compare.seeds_of(row)}, AP "
            f"{fmt(row['ap'])}) against issue #37's target at equal steps: " + "; ".join(checks) + "."]


def _selective_line(full: dict, selective: dict, method: str, claim: str) -> str:
    """One selective tuning against full fine-tuning: task forgetting, general ability and the held-out tasks, each with
    its verdict, and the target-task learning beside them (a method that learns nothing forgets nothing)."""
    forgetting = compare.compare_measure(selective, full, "bwt", True, ACCURACY_RESOLUTION)
    general = compare.compare_measure(selective, full, "log_ppl_ratio", False, PPL_LOG_RESOLUTION)
    said = lambda found: {"better": "holds", "worse": "does not hold"}.get(found["verdict"], found["verdict"])  # noqa: E731
    held_out = ""
    names = sorted(set(selective.get("general_tasks", {})) & set(full.get("general_tasks", {})))
    if names and "heldout_delta" in selective and "heldout_delta" in full:  # the seed paper's held-out measure
        found = compare.compare_measure(selective, full, "heldout_delta", True, ACCURACY_RESOLUTION)
        held_out = (f"; held-out tasks ({', '.join(names)}) mean change {selective['heldout_delta']['mean']:+.3f} vs "
                    f"{full['heldout_delta']['mean']:+.3f} -> **{said(found)}** (margin {found['margin']:.3f})")
    learning = f"R[i][i] - chance {fmt(selective['learned'], True)} vs {fmt(full['learned'], True)}, " if "learned" in selective and "learned" in full else ""
    return (
        f"- {claim} forgets less than full fine-tuning: BWT {fmt(selective['bwt'], True)} ({method}, {compare.seeds_of(selective)}) vs "
        f"{fmt(full['bwt'], True)} (full, {compare.seeds_of(full)}) -> **{said(forgetting)}** on task forgetting (margin "
        f"{forgetting['margin']:.3f}); WikiText-2 perplexity x{math.exp(selective['log_ppl_ratio']['mean']):.2f} vs "
        f"x{math.exp(full['log_ppl_ratio']['mean']):.2f} -> **{said(general)}** on general ability{held_out}. Target-task learning: "
        f"R[i][i] - R[0][i] {fmt(selective['learned_zero_shot'], True)} vs {fmt(full['learned_zero_shot'], True)}, {learning}AP "
        f"{fmt(selective['ap'])} vs {fmt(full['ap'])}. Margins: the larger of the summed seed std and the test sets' "
        f"resolution ({ACCURACY_RESOLUTION} accuracy, {math.exp(PPL_LOG_RESOLUTION) - 1:.0%} perplexity)."
    )


def summarized(report: dict) -> dict:
    """The comparison's report in the benchmark's words, with the published orderings checked."""
    report = compare.summarize({**report, **WORDING, "diagnostics": report.get("diagnostics") or load_methods()[1],
                                "title": "Learning-rate sweep" if report.get("sweep") else "Continual-learning quality",
                                "figure_path": f"bench/results/{report['name']}_matrices.png"})
    return report if report.get("sweep") else {**report, "claims": orderings(report["rows"])}


def markdown(report: dict) -> str:
    return compare.markdown(summarized(report))


def write_report(report: dict, output_dir: Path) -> dict:
    """<name>.json, .md and the figure (tasks/compare.py: write_comparison)."""
    from tasks.compare import write_comparison

    written = write_comparison(summarized(report), output_dir)
    print(written["markdown"])
    return written


def with_earlier_runs(report: dict, earlier: dict) -> dict:
    """``report`` joined with the runs of ``earlier`` (a published report) that it did not run again: its recipes after
    the earlier ones, "full" the baseline again, and the cost fields summed over both."""
    report, earlier = compare.normalized(report), compare.normalized(earlier)
    ran = {(run["recipe"], run["seed"]) for run in report["runs"]}
    kept = [run for run in earlier["runs"] if (run["recipe"], run["seed"]) not in ran]
    order = list(dict.fromkeys([*earlier["recipe_order"], *report["recipe_order"]]))
    runs = sorted([*kept, *report["runs"]], key=lambda run: (order.index(run["recipe"]), run["seed"]))
    dropped = ("methods", "orderings", "method_order", "rows", "verdicts", "multitask_gaps", "claims")
    return {**{key: value for key, value in report.items() if key not in dropped}, "runs": runs, "recipe_order": order,
            "baseline": "full" if "full" in order else order[0],
            "collected_runs": report.get("collected_runs", 0) + len(kept), "seeds": sorted({run["seed"] for run in runs}),
            "runs_wall_minutes": sum(run.get("wall_s", 0.0) for run in runs) / 60,
            "learning_rates": {**earlier.get("learning_rates", {}), **report.get("learning_rates", {})},
            "trainable_params": {**earlier.get("trainable_params", {}), **report.get("trainable_params", {})}}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Methods and seeds come from configs/cl-benchmark-methods.yaml, the sweep's rates "
                                     "from configs/cl-benchmark-sweep.yaml.")
    compared, diagnostics, default_seeds = load_methods()
    parser.add_argument("--methods", nargs="+", choices=[*compared, *diagnostics],
                        help="methods to run (default: every compared one; the diagnostics run only when named)")
    parser.add_argument("--seeds", nargs="+", type=int, help=f"seeds of every method (default: {default_seeds}, plus the file's extra_seeds)")
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel, the cores shared out between them (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the cores shared out between workers)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 methods, 1 seed, a few steps, 10 test records per task")
    parser.add_argument("--sweep", action="store_true", help="the learning-rate sweep (results: <name>_sweep)")
    parser.add_argument("--order", nargs="+", metavar="TASK", help="another task order, e.g. agnews dbpedia amazon")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md (and figure) from the existing JSON in --output-dir")
    parser.add_argument("--state-dir", type=Path, default=ROOT / ".perennial" / "bench" / "cl_quality",
                        help="S3 and MLflow data of the benchmark's services, a folder per results name (--quick: an empty one)")
    parser.add_argument("--add", action="store_true",
                        help="keep the runs of the existing <name>.json that this invocation does not run (another method or "
                        "seed), and write them together: new rows join a published table without rerunning it")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every run, after the method's own")
    parser.add_argument("--name", default=None, help="results file stem (default cl_quality, cl_quality_sweep or cl_quality_order-...)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where <name>.json, .md and the figure go")
    args = parser.parse_args(argv)
    if args.add and (args.sweep or args.quick):
        parser.error("--add joins runs to a published table; a sweep or a --quick smoke run has none")
    if args.sweep and (args.methods or args.order):
        parser.error("--sweep runs every tuning method of the sweep's rates on the first task; drop --methods / --order")
    name = args.name or (f"{DEFAULT_NAME}_sweep" if args.sweep else f"{DEFAULT_NAME}_order-{'-'.join(args.order)}" if args.order else DEFAULT_NAME)
    if args.render:
        write_report({**json.loads((args.output_dir / f"{name}.json").read_text()), "name": name}, args.output_dir)
        return 0
    if not (ROOT.parent / "shared" / "datasets").exists() and "PERENNIAL_DATASETS" not in os.environ:
        parser.error("the benchmark reads ../shared/datasets (or $PERENNIAL_DATASETS), which is not there")
    methods = None if args.sweep else (args.methods or (QUICK_METHODS if args.quick else None))
    seeds = args.seeds or ([default_seeds[0]] if args.quick or args.sweep else None)
    from app.services import running_services
    from flows.compare import compare as run_comparison

    with tempfile.TemporaryDirectory(prefix="perennial-clq-") as tmp:
        state = Path(tmp) / "state" if args.quick else args.state_dir / name  # one state per results name
        with running_services(state, bucket=BUCKET):
            overrides = [*(QUICK_OVERRIDES if args.quick else []), *args.set, f"work_dir={Path(tmp) / 'work'}"]
            # --add: the comparison writes into the temporary folder; the joined report replaces the published one
            run_output = Path(tmp) / "added" if args.add else args.output_dir
            baseline = None if args.sweep or (args.add and "full" not in (methods or ["full"])) else "full"
            report = run_comparison(str(BASE_CONFIG), str(SWEEP_FILE if args.sweep else METHODS_FILE), overrides, seeds, methods,
                                    args.order, args.workers, args.threads, name, str(run_output), baseline,
                                    drop_outputs=True, command=command("bench.cl_quality", argv),
                                    extra={"quick": args.quick, "set": args.set})
    report = {key: value for key, value in report.items() if key not in ("markdown", "json_path", "md_path")}
    if args.add and (args.output_dir / f"{name}.json").exists():
        report = with_earlier_runs(report, json.loads((args.output_dir / f"{name}.json").read_text()))
    write_report(report, args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
