"""Comparing continual-learning recipes: the recipes file, each run's config and key, the aggregation over
seeds, the verdicts and the report (`perennial compare`, flows/compare.py). Pure: no torch, no services.

A recipe is a name and `key=value` overrides on a config (the syntax of `perennial run CONFIG k=v`). The
recipes file:

    recipes:                      # (`methods:` is read the same way)
      full: []
      attn-proj: [cit.tuning.method=attn-proj, cit.optim.lr=3.0e-4]
    seeds: [0]                    # every recipe runs these (--seeds replaces them)
    extra_seeds: {recipes: [full], seeds: [1, 2]}   # more seeds for some
    diagnostics: {head-only: [...]}                 # recipes that run only when named (--only)
    baseline: full                # the recipe every other one is judged against (default: the first)
    resolution: {accuracy: 0.03, perplexity: 0.05}  # the test sets' resolution (below)

A sweep file holds `sweep:` instead of recipes: each tuning method at each of its learning rates trains
the first task alone, on records `skip`..`skip + records` of its sources split by hash, and is scored on
the `validation_fraction` split off them (a validation split: the test records are never read):

    sweep: {steps: 40, skip: 1100, records: 600, validation_fraction: 0.17, rates: {full: [1.0e-5, 1.0e-4]}}

The verdict rule, one for every comparison: a difference between two recipes counts when it is larger than
its margin, the larger of the two rows' summed seed std and the test sets' resolution (default 0.03 of
accuracy, about the sampling noise of 100 test records per task, and 5% of perplexity); otherwise it is
"too close to call". At one seed a row has no spread, so the resolution alone is the margin.

A multi-task recipe (`cit.multitask=true`: every task trained jointly in one stage, the same total steps) is
the upper bound the others are measured against: its row has AP and no BWT, FWT or forgetting (shown "—",
not defined for a joint run), and every row gets its AP gap to it ("AP − multi-task").
"""

from __future__ import annotations

import collections
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from perennial.config import Config, ConfigError, load_config

ACCURACY_RESOLUTION = 0.03
PPL_LOG_RESOLUTION = 0.05  # perplexity ratios within about 5% of each other are even
LEARNED_ENOUGH = 0.05  # below this mean margin over chance the task columns are noise, and the report says so
COLUMNS = [("ap", "AP"), ("bwt", "BWT"), ("fwt", "FWT"), ("forgetting_max", "max forgetting")]
COST_KEYS = ("wall_s", "cpu_s", "peak_rss_mib", "cit_tokens", "attempts")
COUNT_KEYS = ("peak_rss_mib", "cit_tokens", "attempts")  # MLflow keeps floats: these come back as ints


# --- the recipes file ------------------------------------------------------------------------------


@dataclass
class Spec:
    """A recipes (or sweep) file."""

    recipes: dict[str, list[str]]
    seeds: list[int] = field(default_factory=lambda: [0])
    extra_seeds: dict = field(default_factory=dict)  # {"recipes": [...], "seeds": [...]}
    diagnostics: dict[str, list[str]] = field(default_factory=dict)
    sweep: dict | None = None
    baseline: str | None = None
    resolution: dict = field(default_factory=lambda: {"accuracy": ACCURACY_RESOLUTION, "perplexity": PPL_LOG_RESOLUTION})

    @property
    def every_recipe(self) -> dict[str, list[str]]:
        return {**self.recipes, **self.diagnostics}


def load_spec(path: str | Path) -> Spec:
    """Read a recipes or sweep file; ConfigError names what is wrong."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"recipes file {path}: {error}") from None
    named = lambda entries: {str(name): [str(item) for item in (values or [])] for name, values in (entries or {}).items()}  # noqa: E731
    sweep = data.get("sweep")
    recipes = named(data.get("recipes") or data.get("methods"))
    if sweep and not recipes:
        recipes = sweep_recipes(sweep)
    if not recipes:
        raise ConfigError(f"recipes file {path} has no recipes (a `recipes:` mapping of name -> [key=value, ...]) and no `sweep:`")
    extra = data.get("extra_seeds") or {}
    spec = Spec(recipes=recipes, seeds=list(data.get("seeds") or [0]),
                extra_seeds={"recipes": list(extra.get("recipes") or extra.get("methods") or []), "seeds": list(extra.get("seeds") or [])},
                diagnostics=named(data.get("diagnostics")), sweep=sweep if sweep and recipes == sweep_recipes(sweep) else None,
                baseline=data.get("baseline"), resolution={**Spec(recipes={}).resolution, **(data.get("resolution") or {})})
    if spec.baseline is not None and spec.baseline not in spec.every_recipe:
        raise ConfigError(f"recipes file {path}: baseline {spec.baseline!r} is not one of its recipes")
    return spec


def sweep_recipes(sweep: dict) -> dict[str, list[str]]:
    """One recipe per (tuning method, learning rate), named `tuning@lr`: first task only, the sweep's step budget."""
    return {
        f"{tuning}@{lr:g}": [f"cit.tuning.method={tuning}", f"cit.optim.lr={lr:g}", f"cit.optim.max_steps={sweep['steps']}"]
        for tuning, rates in sweep["rates"].items()
        for lr in rates
    }


def tuning_of(overrides: list[str]) -> str:
    """The tuning method a recipe's overrides select (full fine-tuning where they set none)."""
    chosen = [item.split("=", 1)[1] for item in overrides if item.startswith("cit.tuning.method=")]
    return chosen[-1] if chosen else "full"


def run_pairs(spec: Spec, names: list[str], seeds: list[int] | None = None) -> list[tuple[str, int]]:
    """(recipe, seed) pairs to run: ``seeds`` for every recipe when given, else the file's seeds for every
    recipe plus its extra seeds for the recipes it names."""
    if seeds is not None:
        return [(name, seed) for seed in seeds for name in names]
    pairs = [(name, seed) for seed in spec.seeds for name in names]
    return pairs + [(name, seed) for seed in spec.extra_seeds.get("seeds", []) for name in names
                    if name in spec.extra_seeds.get("recipes", [])]


# --- each run's config and key ---------------------------------------------------------------------


def variant_config(cfg: Config, variant: dict | None) -> Config:
    """``cfg`` with another task order (``{"order": [...]}``) or a sweep's data (``{"sweep": settings}``: the
    first task alone, read from records `skip`.. of its sources, its test split a validation split; no
    held-out tasks)."""
    if not variant:
        return cfg
    datasets = cfg.data.datasets
    tasks = [d for d in datasets if d.resolved_role == "task"]
    text = [d for d in datasets if d.resolved_role in ("general", "domain")]
    heldout = [d for d in datasets if d.resolved_role == "heldout"]
    if not tasks:
        raise ConfigError("a task order or a sweep needs data.datasets with tasks (data.source: datasets)")
    if variant.get("order"):
        by_name = {task.name: task for task in tasks}
        if sorted(variant["order"]) != sorted(by_name):
            raise ConfigError(f"--order must list each task of the config once: {sorted(by_name)}")
        tasks = [by_name[name] for name in variant["order"]]
    if variant.get("sweep"):
        sweep, first = variant["sweep"], tasks[0]
        sources = [src.model_copy(update={"skip": sweep["skip"], "limit": sweep["records"], "split": "hash"}) for src in first.sources]
        tasks = [first.model_copy(update={"sources": sources, "test_fraction": sweep["validation_fraction"]})]
        heldout = []
    data = cfg.data.model_copy(update={"datasets": [*text, *tasks, *heldout]})
    return type(cfg).model_validate(cfg.model_copy(update={"data": data}).model_dump(mode="json"))


def slug(name: str) -> str:
    """A recipe name as a run key, registered-model and MLflow metric component: replay-10% -> replay-10pct."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace("%", "pct").replace("@", "-at-")).strip("-") or "recipe"


def recipe_config(config_path: str | Path | None, overrides: list[str], seed: int, variant: dict | None = None,
                  lineage: str | None = None) -> Config:
    """The validated config of one run: the config, the recipe's overrides (then the comparison's own), the
    seed, the variant. ``lineage`` names its own registered model (runs of one lineage take turns, and a
    comparison's runs are no versions of the config's model): registry off, trained from the base."""
    own = [] if lineage is None else [f"tracking.registered_model={lineage}", "registry.enabled=false", "lineage.continue_from=none"]
    return variant_config(load_config(config_path, [*overrides, f"seed={seed}", *own]), variant)


def run_key(cfg: Config, recipe: str, seed: int) -> str:
    """A run's key: its recipe, seed and what it computes (the outputs digest: not where the services are), so a
    rerun of the comparison resumes each run where it stopped and finds the finished ones."""
    return f"{cfg.run_name}-{slug(recipe)}-s{seed}-{cfg.outputs_digest()[:12]}"


# --- aggregation over seeds ------------------------------------------------------------------------


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def is_multitask(run: dict) -> bool:
    """Whether a run trained every task jointly in one stage (cit.multitask): a row of its ``trained_by_row`` names
    several tasks. Runs recorded before multi-task runs existed have no ``trained_by_row``: one task per row."""
    return any(not isinstance(entry, str) for entry in run.get("trained_by_row") or [])


def just_trained(run: dict) -> list[int | None]:
    """Per task, the row of the accuracy matrix right after training on it: row i + 1 for task i of a sequence
    (row 0 is before CIT), row 1 for every task of a joint run; None for a task scored but never trained."""
    trained = run.get("trained_by_row") or run["tasks"]
    return [next((i + 1 for i, entry in enumerate(trained) if task in ([entry] if isinstance(entry, str) else entry)), None)
            for task in run["tasks"]]


def learned_over_chance(run: dict, chance: dict[str, float]) -> float:
    """Mean over tasks of R[i][i] - chance: how well a task is learned right after training on it."""
    matrix = run["accuracy_matrix"]
    return statistics.fmean(matrix[row][j] - chance[task] for j, (task, row) in enumerate(zip(run["tasks"], just_trained(run)))
                            if row is not None)


def learned_over_zero_shot(run: dict) -> float:
    """Mean over tasks of R[i][i] - R[0][i]: what training on a task added to the base model's zero-shot score."""
    matrix = run["accuracy_matrix"]
    return statistics.fmean(matrix[row][j] - matrix[0][j] for j, row in enumerate(just_trained(run)) if row is not None)


def aggregate(results: list[dict], recipes: list[str], chance: dict[str, float] | None = None) -> dict[str, dict]:
    """One row per recipe with runs: mean and sample std over its seeds of every column (perplexity in log space)."""
    rows = {}
    for recipe in recipes:
        runs = [r for r in results if _name(r) == recipe]
        if not runs:
            continue
        row = {key: mean_std([r["metrics"][key] for r in runs]) for key, _ in COLUMNS if all(key in r["metrics"] for r in runs)}
        row["learned_zero_shot"] = mean_std([learned_over_zero_shot(r) for r in runs])
        names = [name for name in runs[0].get("general_tasks") or {} if all(name in (r.get("general_tasks") or {}) for r in runs)]
        row["general_tasks"] = {name: {stage: mean_std([r["general_tasks"][name][stage] for r in runs]) for stage in ("base", "final", "delta")}
                                for name in names}
        if names:  # the held-out tasks' mean change per run: the quantity the verdicts compare, with its own seed spread
            row["heldout_delta"] = mean_std([statistics.fmean(r["general_tasks"][name]["delta"] for name in names) for r in runs])
        row["cost"] = {key: statistics.fmean(r[key] for r in runs) for key in COST_KEYS if all(key in r for r in runs)}
        row["log_ppl_ratio"] = mean_std([math.log(r["metrics"]["general_ppl_final"] / r["metrics"]["general_ppl_base"]) for r in runs])
        row["ppl_base"] = mean_std([r["metrics"]["general_ppl_base"] for r in runs])
        row["ppl_final"] = mean_std([r["metrics"]["general_ppl_final"] for r in runs])
        if chance and all(task in chance for task in runs[0]["tasks"]):  # free generation has no chance level
            row["learned"] = mean_std([learned_over_chance(r, chance) for r in runs])
        row["final_row"] = [statistics.fmean(r["accuracy_matrix"][-1][j] for r in runs) for j in range(len(runs[0]["tasks"]))]
        row["multitask"] = all(is_multitask(r) for r in runs)
        rows[recipe] = row
    return rows


def multitask_bound(rows: dict[str, dict]) -> str | None:
    """The recipe whose runs trained every task jointly (the multi-task upper bound), the first such; None without one."""
    return next((recipe for recipe, row in rows.items() if row.get("multitask") and "ap" in row), None)


def multitask_gaps(rows: dict[str, dict], resolution: float) -> dict[str, dict]:
    """Every other recipe's AP gap to the multi-task bound ("gap to multi-task", the headline figure of CL papers):
    the difference, its margin (the one rule) and whether the recipe reaches the bound: "below the bound",
    "reaches the bound" (within the margin) or "above the bound". Empty without a multi-task recipe."""
    bound = multitask_bound(rows)
    gaps = {}
    for recipe, row in rows.items():
        if bound is None or recipe == bound or "ap" not in row:
            continue
        gap = row["ap"]["mean"] - rows[bound]["ap"]["mean"]
        noise = margin(row["ap"], rows[bound]["ap"], resolution)
        word = {"holds": "above the bound", "does not hold": "below the bound"}.get(verdict(gap, noise), "reaches the bound")
        gaps[recipe] = {"against": bound, "gap": gap, "margin": noise, "verdict": word}
    return gaps


def _name(run: dict) -> str:
    return run.get("recipe", run.get("method"))  # results written before the product named them recipes say "method"


# --- margins and verdicts ----------------------------------------------------------------------------


def margin(a: dict, b: dict, resolution: float) -> float:
    """The one margin rule: the larger of the two rows' summed seed std and the test sets' resolution."""
    return max(resolution, a["std"] + b["std"])


def verdict(advantage: float, noise: float) -> str:
    """How a claim came out: `advantage` is the measured difference signed so that > 0 agrees with it.

    "holds" past +noise, "does not hold" past -noise, "too close to call" in between, so one seed's 0.002
    difference is not reported as a result. `noise` is the `margin`.
    """
    if advantage > noise:
        return "holds"
    if advantage < -noise:
        return "does not hold"
    return "too close to call"


# (row key, label, higher is better, which resolution)
MEASURES = [("ap", "AP", True, "accuracy"), ("bwt", "BWT", True, "accuracy"), ("heldout_delta", "held-out change", True, "accuracy"),
            ("log_ppl_ratio", "general perplexity", False, "perplexity")]


def compare_measure(row: dict, reference: dict, key: str, higher_is_better: bool, resolution: float) -> dict:
    """``row`` against ``reference`` on one measure: the difference (signed so > 0 is better), its margin and
    the verdict "better", "worse" or "too close to call"."""
    advantage = (row[key]["mean"] - reference[key]["mean"]) * (1 if higher_is_better else -1)
    noise = margin(row[key], reference[key], resolution)
    word = {"holds": "better", "does not hold": "worse"}.get(verdict(advantage, noise), "too close to call")
    return {"advantage": advantage, "margin": noise, "verdict": word}


def verdicts(rows: dict[str, dict], baseline: str, resolution: dict) -> list[dict]:
    """Every other recipe against ``baseline`` on AP, BWT, the held-out tasks' change and general perplexity."""
    found = []
    for recipe, row in rows.items():
        if recipe == baseline or baseline not in rows:
            continue
        for key, label, higher, kind in MEASURES:
            if key in row and key in rows[baseline]:
                found.append({"recipe": recipe, "against": baseline, "measure": key, "label": label,
                              **compare_measure(row, rows[baseline], key, higher, resolution[kind])})
    return found


def verdict_lines(found: list[dict], rows: dict[str, dict]) -> list[str]:
    """One line per recipe: each measure's values, which recipe is better or too close to call, and the margin."""
    lines = []
    for recipe in dict.fromkeys(v["recipe"] for v in found):
        parts = []
        for v in (v for v in found if v["recipe"] == recipe):
            baseline = v["against"]
            winner = {"better": recipe, "worse": baseline}.get(v["verdict"])
            said = f"**{winner} better**" if winner else "**too close to call**"
            if v["measure"] == "log_ppl_ratio":
                values = f"x{math.exp(rows[recipe]['log_ppl_ratio']['mean']):.2f} vs x{math.exp(rows[baseline]['log_ppl_ratio']['mean']):.2f}"
                noise = f"{math.exp(v['margin']) - 1:.0%}"
            else:
                values = f"{fmt(rows[recipe][v['measure']], v['measure'] != 'ap')} vs {fmt(rows[baseline][v['measure']], v['measure'] != 'ap')}"
                noise = f"{v['margin']:.3f}"
            parts.append(f"{v['label']} {values} -> {said} (margin {noise})")
        lines.append(f"- {recipe} ({seeds_of(rows[recipe])}) vs {found[0]['against']} ({seeds_of(rows[found[0]['against']])}): " + "; ".join(parts) + ".")
    return lines


def margin_rule(resolution: dict) -> str:
    return (f"Margins: the larger of the two rows' summed seed std and the test sets' resolution ({resolution['accuracy']:g} "
            f"accuracy, {math.exp(resolution['perplexity']) - 1:.0%} perplexity); a difference within its margin is too close to call.")


# --- the sweep --------------------------------------------------------------------------------------


def sweep_table(results: list[dict], sweep: dict) -> dict:
    """Validation accuracy (R[1][0]: the first task's held-out records after training on them) per tuning method
    and rate, and the chosen rate: the best, the lower one on a tie."""
    table_rows, chosen = {}, {}
    for tuning, rates in sweep["rates"].items():
        scores = {}
        for lr in rates:
            runs = [r for r in results if _name(r) == f"{tuning}@{lr:g}"]
            if runs:
                scores[f"{lr:g}"] = {"validation": statistics.fmean(r["accuracy_matrix"][1][0] for r in runs),
                                     "zero_shot": statistics.fmean(r["accuracy_matrix"][0][0] for r in runs)}
        if scores:
            table_rows[tuning] = scores
            chosen[tuning] = max(sorted(scores, key=float), key=lambda lr: scores[lr]["validation"])
    return {"scores": table_rows, "chosen": chosen}


def edge_notes(result: dict) -> list[str]:
    """Say where a chosen rate is the highest or lowest tried: the best rate may then lie outside the grid."""
    notes = []
    for tuning, scores in result["scores"].items():
        tried = sorted(scores, key=float)
        if len(tried) > 1 and result["chosen"][tuning] in (tried[0], tried[-1]):
            side = "highest" if result["chosen"][tuning] == tried[-1] else "lowest"
            notes.append(f"- {tuning}: the chosen rate {result['chosen'][tuning]} is the {side} one tried, so the best may lie beyond it.")
    return [*notes, ""] if notes else []


# --- the report ---------------------------------------------------------------------------------------


def fmt(stat: dict, signed: bool = False) -> str:
    sign = "+" if signed else ""
    mean = f"{stat['mean']:{sign}.3f}"
    return mean if stat["n"] < 2 else f"{mean} ± {stat['std']:.3f}"  # one seed has no spread to show


def seeds_of(row: dict) -> str:
    """How many seeds a row's means are over: a 1-seed row beside a 3-seed one has no spread of its own."""
    n = row["learned_zero_shot"]["n"]
    return f"{n} seed{'s' if n != 1 else ''}"


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; floats keep the precision the caller formatted them with."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


_MACHINE_KEYS = {"cpu_model", "logical_cores", "memory_gib", "native_bf16", "torch_threads", "python", "platform"}


def machine_line(info: dict) -> str:
    versions = ", ".join(f"{name} {info[name]}" for name in info if name not in _MACHINE_KEYS and info[name])
    memory = f", {info['memory_gib']} GiB RAM" if info.get("memory_gib") else ""
    bf16 = {True: ", native bf16", False: ", no native bf16"}.get(info.get("native_bf16"), "")  # older results lack the key
    threads = f"; torch threads {info['torch_threads']}" if "torch_threads" in info else ""
    return (f"{info['cpu_model']}, {info['logical_cores']} logical cores{memory}{bf16}; {info['platform']}; "
            f"Python {info['python']}, {versions}{threads}.")


def normalized(report: dict) -> dict:
    """A report as this module writes it, also from the results of before (`method` for `recipe`); runs in order."""
    runs = [{"recipe": _name(run), **{k: v for k, v in run.items() if k != "method"}} for run in report["runs"]]
    order = report.get("recipe_order") or report.get("method_order") or list(dict.fromkeys(run["recipe"] for run in runs))
    return {**report, "runs": runs, "recipe_order": order}


def summarize(report: dict) -> dict:
    """The aggregated rows and the verdicts of a report's runs (a sweep: its table of rates)."""
    report = normalized(report)
    if report.get("sweep"):
        return {**report, "sweep_result": sweep_table(report["runs"], report["sweep"])}
    rows = aggregate(report["runs"], report["recipe_order"], report["chance"])
    resolution = report.get("resolution") or Spec(recipes={}).resolution
    baseline = report.get("baseline") or next(iter(rows))
    return {**report, "rows": rows, "baseline": baseline, "resolution": resolution, "verdicts": verdicts(rows, baseline, resolution),
            "multitask_gaps": multitask_gaps(rows, resolution["accuracy"])}


def markdown(report: dict) -> str:
    """The comparison as a markdown section: what ran where, the table, the cost, the verdicts (see `summarize`)."""
    if report.get("sweep"):
        return sweep_markdown(report)
    rows, tasks, name = report["rows"], report["tasks"], report.get("name", "")
    general = report.get("general_text", "general")
    noun = report.get("recipe_noun", "recipe")  # the benchmark's reports say "method"
    title = report.get("title", "Comparison of recipes")
    body = [
        f"## {title}" + (f": {name}" if name and name != report.get("default_name") else "")
        + (f" with {', '.join(report['set'])}" if report.get("set") else ""),
        "",
        f"Command: `{report['command']}`"
        + (f" (every run from scratch: `{report['rerun_command']}`)" if report.get("rerun_command") not in (None, report["command"]) else "")
        + f" ({report['wall_minutes']:.0f} min with {report['workers']} workers"
        + (f"; {report['collected_runs']} of {len(report['runs'])} runs were finished by earlier invocations "
           "and collected from their MLflow or results, their wall times are in the cost table" if report.get("collected_runs") else "")
        + (f"; the runs' summed wall time is {report['runs_wall_minutes'] / 60:.1f} h" if report.get("runs_wall_minutes") else "")
        + resumed(report["runs"])
        + "). "
        + ("At this report (the runs' own load was not recorded): " if report.get("collected_runs") == len(report["runs"]) else "")
        + f"{report['load']} {machines_line(report)}",
        "",
        f"Base model: {report['model']}{precisions(report['runs'])}; "
        + report.get("description", "CIT over the tasks {tasks}").format(tasks=" -> ".join(tasks))
        + f" (chance: {report['chance']}). Held-out general ability, never trained: {general} perplexity and the "
        "held-out tasks' zero-shot scores, before CIT -> after the last task (change). R[i][i] - R[0][i]: what training on a "
        f"task added to its zero-shot score, the mean over tasks; the accuracy matrix of each {noun} is plotted in "
        f"`{report.get('figure_path', report.get('figure', name + '_matrices.png'))}`. Every {noun} has the same budget "
        f"({report['budget']}); seeds {report['seeds']} (the seeds column counts the runs behind each row); mean ± sample std "
        "over seeds. AP = mean of the last row of R; BWT and FWT as in docs/metrics.md; max forgetting = the largest drop of a "
        f"task from its best earlier score; perplexity is {general} test, before CIT -> after the last task (geometric mean over seeds).",
        "",
    ]
    diagnostics = [f"{recipe} = `{' '.join(overrides)}`" for recipe, overrides in (report.get("diagnostics") or {}).items() if recipe in rows]
    if diagnostics:
        body += [f"Diagnostics, not {noun}s ({report.get('recipes_file', 'the recipes file')}): " + "; ".join(diagnostics) + ".", ""]
    bound = multitask_bound(rows)
    gaps = report.get("multitask_gaps") or {}
    if bound is not None:
        body += [f"**{bound}** is the multi-task upper bound (`cit.multitask=true`): every task trained jointly in one stage "
                 f"for the same total steps, then scored once, so its R[i][i] is its final row; BWT, FWT and forgetting are "
                 f"not defined for it (—). AP − multi-task: each {noun}'s AP minus {bound}'s, the gap to multi-task.", ""]
    general_names = sorted({task for row in rows.values() for task in row.get("general_tasks", {})})
    headers = [noun, "seeds", "R[i][i] - R[0][i]", "R[i][i] - chance", *(title for _, title in COLUMNS),
               *(["AP − multi-task"] if bound is not None else []), f"{general} ppl",
               *(f"{task} (held out)" for task in general_names), *(f"final {task}" for task in tasks)]
    table_rows = []
    for recipe, row in rows.items():
        ppl = f"{row['ppl_base']['mean']:.1f} -> {row['ppl_base']['mean'] * math.exp(row['log_ppl_ratio']['mean']):.1f}"
        gap = ["—" if recipe not in gaps else f"{gaps[recipe]['gap']:+.3f}"] if bound is not None else []
        table_rows.append([recipe, str(row["learned_zero_shot"]["n"]), fmt(row["learned_zero_shot"], True),
                           fmt(row["learned"], True) if "learned" in row else "n/a",
                           *(fmt(row[key], key in ("bwt", "fwt")) if key in row else "—" for key, _ in COLUMNS), *gap, ppl,
                           *(_general_cell(row.get("general_tasks", {}).get(task)) for task in general_names),
                           *(f"{value:.3f}" for value in row["final_row"])])
    body += [table(headers, table_rows), ""]
    costs = {recipe: row["cost"] for recipe, row in rows.items() if row.get("cost")}
    if costs:
        body += [
            "Cost per run (mean over seeds): the CIT learning rate, trainable parameters of the CIT tuning, tokens trained over "
            "the CIT stages, wall and CPU time of the whole run (evaluation included; the base and DAP models are built once, by "
            "the first run, and taken from the cache by the others), and the run's peak resident memory (in the process that "
            "ran it, one run at a time). Wall times are with the other work of the machine at the time; CPU time is the "
            "steadier measure.",
            "",
            table([noun, "CIT lr", "trainable params", "CIT tokens", "wall (min)", "CPU (min)", "peak RSS (GiB)", "AP per CPU-hour"],
                  [[recipe, _rate(report.get("learning_rates", {}).get(recipe)), _count(report.get("trainable_params", {}).get(recipe)),
                    _count(cost.get("cit_tokens")), _minutes(cost.get("wall_s")), _minutes(cost.get("cpu_s")),
                    "n/a" if cost.get("peak_rss_mib") is None else f"{cost['peak_rss_mib'] / 1024:.2f}",
                    "n/a" if not cost.get("cpu_s") or "ap" not in rows[recipe] else f"{rows[recipe]['ap']['mean'] / (cost['cpu_s'] / 3600):.2f}"]
                   for recipe, cost in costs.items()]),
            "",
        ]
    learned = {recipe: row["learned"]["mean"] for recipe, row in rows.items() if "learned" in row}
    best = max(learned.values(), default=1.0)
    if best < LEARNED_ENOUGH:
        body += [f"**Caveat: no {noun} in this table learns the tasks at this budget** (R[i][i] - chance is at most {best:+.3f}, "
                 f"the accuracy right after training on a task against guessing). AP, BWT and FWT then differ between {noun}s by "
                 f"about their seed spread, so this table cannot say which {noun} forgets the tasks less; the perplexity column, "
                 "which moves by orders of magnitude, can.", ""]
    unlearned = [recipe for recipe, value in learned.items() if value < LEARNED_ENOUGH]
    if unlearned and best >= LEARNED_ENOUGH:
        body += [f"**{', '.join(unlearned)}: right after training on a task, within +{LEARNED_ENOUGH} of chance** at this budget and "
                 "learning rate. Their small BWT and perplexity change mean they learned little, not that they kept what they "
                 f"learned; compare {noun}s on forgetting only among those that learn.", ""]
    if report.get("verdicts"):
        body += [f"Which {noun} is better, against {report['baseline']}:", "", *verdict_lines(report["verdicts"], rows), "",
                 margin_rule(report["resolution"]), ""]
    if gaps:
        body += [f"Gap to multi-task ({bound}, AP {fmt(rows[bound]['ap'])}):", "",
                 *(f"- {recipe} ({seeds_of(rows[recipe])}): AP {fmt(rows[recipe]['ap'])}, gap {found['gap']:+.3f} -> "
                   f"**{found['verdict']}** (margin {found['margin']:.3f})" for recipe, found in gaps.items()), ""]
    if report.get("claims"):
        body += [report.get("claims_heading", "Claims, checked:"), "", *report["claims"], ""]
    if report.get("quick"):
        body.insert(2, "**Smoke run (`--quick`): a few steps only; these numbers say nothing about the recipes.**\n")
    return "\n".join(body) + "\n"


def sweep_markdown(report: dict) -> str:
    sweep, result = report["sweep"], report["sweep_result"]
    rates = sorted({lr for scores in result["scores"].values() for lr in scores}, key=float)
    rows = [[tuning, f"{next(iter(scores.values()))['zero_shot']:.3f}",
             *(f"**{scores[lr]['validation']:.3f}**" if lr == result["chosen"][tuning] else
               (f"{scores[lr]['validation']:.3f}" if lr in scores else "") for lr in rates)]
            for tuning, scores in result["scores"].items()]
    return "\n".join([
        f"### {report.get('title', 'Learning-rate sweep')}",
        "",
        f"Command: `{report['command']}` ({runs_line(report)}). {report['load']} {machines_line(report)} "
        f"Precision {precisions(report['runs']).strip(' ()')}.",
        "",
        f"Each tuning method at each rate trains the first task ({report['tasks'][0]}) alone for {sweep['steps']} steps on "
        f"records {sweep['skip']}..{sweep['skip'] + sweep['records']} of its file{report.get('sweep_records_note', '')}, and is "
        f"scored on the {sweep['validation_fraction']:.0%} of them split off by hash: the test records are never "
        "seen. Validation accuracy after training (zero-shot before it); the chosen rate in bold. A CL method uses its "
        "tuning method's rate (on the first task alone replay, EWC and SEEKR have nothing to keep yet). The validation "
        f"split holds about {sweep['records'] * sweep['validation_fraction']:.0f} records, so a difference of "
        f"{1 / max(1, sweep['records'] * sweep['validation_fraction']):.2f} is about one record: rates within "
        f"{2 / max(1, sweep['records'] * sweep['validation_fraction']):.2f} of each other are a tie within noise.",
        "",
        table(["tuning", "zero-shot", *(f"lr {lr}" for lr in rates)], rows),
        "",
        *edge_notes(result),
    ]) + "\n"


def machines_line(report: dict) -> str:
    """The machines the runs trained on (each run records its own; older ones only the report's), and their torch threads."""
    machines = [run.get("machine") or report["machine"] for run in report["runs"]]
    lines = [machine_line({key: value for key, value in info.items() if key != "torch_threads"}) for info in machines]
    threads = "/".join(str(n) for n in sorted({info.get("torch_threads") for info in machines} - {None}))
    threads = f" Torch threads per run: {threads}." if threads else ""
    if len(set(lines)) == 1:
        return f"Machine: {lines[0]}{threads}"
    counted = collections.Counter(lines).items()
    return "Machines: " + "; ".join(f"{count} run{'s' if count > 1 else ''} on {line}" for line, count in counted) + threads


def precisions(runs: list[dict]) -> str:
    counts = collections.Counter(run.get("precision", "not recorded") for run in runs)
    return " (" + ", ".join(f"{name} in {count} of {len(runs)} runs" for name, count in counts.items()) + ")"


def resumed(runs: list[dict]) -> str:
    """"; N resumed after an interruption ...": the runs whose cost sums attempts, or ""."""
    found = [f"{_name(run)} seed {run['seed']} ({run['attempts']})" for run in runs if run.get("attempts", 1) > 1]
    return (f"; {len(found)} resumed after an interruption, their wall and CPU time summed over the attempts: "
            + ", ".join(found)) if found else ""


def runs_line(report: dict) -> str:
    """How long the runs took: an invocation's wall time leaves out the runs it collected from earlier ones."""
    walls = [run["wall_s"] for run in report["runs"] if run.get("wall_s")]
    line = f"{len(report['runs'])} runs, median {statistics.median(walls) / 60:.1f} min each" if walls else f"{len(report['runs'])} runs"
    line += resumed(report["runs"])
    if report.get("collected_runs"):
        line += (f"; this invocation {report['wall_minutes']:.0f} min, {report['collected_runs']} runs collected from earlier "
                 "invocations (their wall times, in the JSON, include time paused or under other load)")
    return line


def _general_cell(stat: dict | None) -> str:
    return "n/a" if stat is None else f"{stat['base']['mean']:.2f} -> {stat['final']['mean']:.2f} ({stat['delta']['mean']:+.2f})"


def _rate(value) -> str:
    return "n/a" if value is None else f"{value:.0e}"


def _count(value) -> str:
    if value is None:
        return "n/a"
    return f"{value / 1e6:.1f}M" if value >= 1e6 else f"{value / 1e3:.0f}k"


def _minutes(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f}"
