"""The CL quality benchmark, a client of `perennial compare`: its recipes, its variants and its check of the published orderings."""

import json
import math

import pytest

from pathlib import Path

from bench.cl_quality import BASE_CONFIG, best_recipe_lines, load_methods, orderings
from perennial import compare
from perennial.compare import aggregate
from bench.report import assemble

ROOT = Path(__file__).resolve().parents[1]


def bench_config(overrides, seed, variant=None):
    """The validated config of one benchmark run."""
    return compare.recipe_config(BASE_CONFIG, overrides, seed, variant)


def run(method, seed, ap, bwt, ppl_final, final_row=(0.5, 0.5)):
    return {"method": method, "seed": seed, "tasks": ["a", "b"], "accuracy_matrix": [[0.0, 0.0], [final_row[0], 0.0], list(final_row)],
            "metrics": {"ap": ap, "bwt": bwt, "fwt": 0.0, "forgetting_max": -bwt, "general_ppl_base": 10.0,
                        "general_ppl_final": ppl_final}}


def test_aggregate_is_mean_and_sample_std_over_seeds():
    rows = aggregate([run("full", 0, 0.4, -0.2, 100.0), run("full", 1, 0.6, -0.4, 1000.0)], ["full", "lora"])
    assert set(rows) == {"full"}  # a method without runs is left out, not reported as zeros
    assert rows["full"]["ap"]["mean"] == pytest.approx(0.5)
    assert rows["full"]["ap"]["std"] == pytest.approx(math.sqrt(0.02))
    assert rows["full"]["bwt"]["mean"] == pytest.approx(-0.3)
    # perplexity ratios average in log space: x10 and x100 -> x31.6
    assert math.exp(rows["full"]["log_ppl_ratio"]["mean"]) == pytest.approx(math.sqrt(10 * 100))


def test_orderings_report_whichever_way_they_go():
    kept = aggregate([run("full", 0, 0.5, -0.3, 500.0), run("attn-proj", 0, 0.45, -0.05, 20.0)], ["full", "attn-proj"])
    [line] = orderings(kept)
    assert line.count("**holds**") == 2
    lost = aggregate([run("full", 0, 0.5, -0.05, 20.0), run("attn-proj", 0, 0.45, -0.3, 500.0)], ["full", "attn-proj"])
    assert orderings(lost)[0].count("**does not hold**") == 2
    # one seed each, no spread: the test sets' resolution is the margin, so a 0.002 gap is no result
    assert "(margin 0.030)" in line
    tie = aggregate([run("full", 0, 0.5, -0.148, 30.0), run("attn-proj", 0, 0.5, -0.146, 31.0)], ["full", "attn-proj"])
    assert orderings(tie)[0].count("**too close to call**") == 2  # BWT and perplexity both within their margins
    # with spread, a gap smaller than the summed seed std is too close to call as well
    noisy = aggregate([run("full", s, 0.5, bwt, 500.0) for s, bwt in enumerate((-0.3, -0.1))]
                      + [run("attn-proj", s, 0.45, bwt, 20.0) for s, bwt in enumerate((-0.25, -0.05))], ["full", "attn-proj"])
    assert "-> **too close to call** on task forgetting (margin 0.283)" in orderings(noisy)[0]
    assert "(attn-proj, 2 seeds) vs -0.200 ± 0.141 (full, 2 seeds)" in orderings(noisy)[0]  # each row says what it averages
    # the seed paper's held-out measure: the general tasks' accuracy change beside the perplexity
    def held_out(result, delta):
        return {**result, "general_tasks": {"sst2": {"base": 0.8, "final": 0.8 + delta, "delta": delta}}}

    tasks_kept = aggregate([held_out(run("full", 0, 0.5, -0.3, 500.0), -0.2), held_out(run("attn-proj", 0, 0.45, -0.05, 20.0), -0.01)],
                           ["full", "attn-proj"])
    assert "held-out tasks (sst2) mean change -0.010 vs -0.200 -> **holds**" in orderings(tasks_kept)[0]
    tasks_lost = aggregate([held_out(run("full", 0, 0.5, -0.3, 500.0), 0.0), held_out(run("attn-proj", 0, 0.45, -0.05, 20.0), -0.1)],
                           ["full", "attn-proj"])
    assert "mean change -0.100 vs +0.000 -> **does not hold**" in orderings(tasks_lost)[0]
    # the seed paper's other selective tuning, MLP gate and up with down frozen, is checked on its own line
    both = aggregate([run("full", 0, 0.5, -0.3, 500.0), run("attn-proj", 0, 0.45, -0.29, 520.0), run("mlp-gate-up", 0, 0.5, -0.1, 20.0)],
                     ["full", "attn-proj", "mlp-gate-up"])
    attn_line, mlp_line = orderings(both)
    assert attn_line.startswith("- Selective attention tuning") and "-> **too close to call** on task forgetting" in attn_line
    assert mlp_line.startswith("- Tuning only MLP gate and up (down frozen) forgets less") and "(mlp-gate-up, 1 seed)" in mlp_line
    assert mlp_line.count("**holds**") == 2
    far = aggregate([run("seekr-1%", 0, 0.2, -0.4, 50.0), run("replay-10%", 0, 0.5, -0.05, 20.0)], ["seekr-1%", "replay-10%"])
    assert "**does not hold**" in orderings(far)[0]
    # one seed each: the margin printed is the one applied, the test sets' resolution, never a zero seed std
    near = aggregate([run("seekr-1%", 0, 0.477, -0.065, 50.0), run("replay-10%", 0, 0.5, -0.037, 20.0)], ["seekr-1%", "replay-10%"])
    assert "(gap -0.023, margin 0.030: the larger of the summed seed std and the test sets' resolution)" in orderings(near)[0]
    assert "**holds**" in orderings(near)[0]
    behind = aggregate([run("seekr-1%", 0, 0.46, -0.065, 50.0), run("replay-10%", 0, 0.5, -0.037, 20.0)], ["seekr-1%", "replay-10%"])
    assert "**does not hold**" in orderings(behind)[0]


def test_the_best_recipe_is_judged_against_every_single_method_the_bound_and_forgetting():
    def multitask(result):  # one stage trained both tasks
        return {**result, "accuracy_matrix": result["accuracy_matrix"][::2], "trained_by_row": [["a", "b"]]}

    names = ["full", "replay-10%", "multitask", "lwf+replay-10%", "mlp-gate-up+replay-10%"]
    runs = [run("full", 0, 0.60, -0.20, 12.0), run("replay-10%", 0, 0.78, -0.03, 11.0), multitask(run("multitask", 0, 0.80, 0.0, 11.0)),
            run("lwf+replay-10%", 0, 0.83, -0.01, 10.2), run("mlp-gate-up+replay-10%", 0, 0.70, -0.10, 10.0)]
    [line] = best_recipe_lines(aggregate(runs, names))  # the combination with the highest AP is the one judged
    assert "highest AP: lwf+replay-10%, 1 seed, AP 0.830" in line
    assert line.count("**met**") == 4 and "**not met**" not in line
    assert "AP >= the multi-task bound - 0.02 (0.780)" in line
    # one seed of 0.79 against replay-10%'s 0.78 is within the margin: not beaten; BWT and perplexity miss too
    runs[3] = run("lwf+replay-10%", 0, 0.79, -0.05, 11.5)
    [line] = best_recipe_lines(aggregate(runs, names))
    assert "beats every single method on AP: **not met** (ahead of it or too close to call: replay-10% 0.780)" in line
    assert "BWT >= -0.02: **not met** (-0.050)" in line and "perplexity within 5% of the base model: **not met** (x1.15)" in line
    assert best_recipe_lines(aggregate(runs[:3], names)) == []  # no combination, no verdict


def test_every_issue_method_runs_and_the_five_compared_ones_with_three_seeds():
    from bench.cl_quality import METHODS_FILE

    run_pairs = lambda names, seeds: compare.run_pairs(compare.load_spec(METHODS_FILE), names, seeds)  # noqa: E731
    methods, _, _ = load_methods()
    assert set(methods) == {"full", "attn-proj", "mlp-gate-up", "lora", "mora", "replay-1%", "replay-10%", "ewc", "lwf", "seekr-1%", "olora",
                            "multitask",  # the multi-task upper bound (cit.multitask), the row every method is measured against
                            "replay-10%+ssr", "merge", "mlp-gate-up+replay-10%"}  # issue #37's methods
    pairs = run_pairs(list(methods), None)
    seeds = {method: sorted(seed for m, seed in pairs if m == method) for method in methods}
    assert all(seeds[method] == [0, 1, 2] for method in ("full", "attn-proj", "lora", "replay-10%", "seekr-1%", "replay-10%+ssr"))
    assert all(len(seeds[method]) >= 1 for method in methods)
    assert run_pairs(["full", "ewc"], [3]) == [("full", 3), ("ewc", 3)]  # --seeds: those seeds for every method


def test_every_method_uses_its_tuning_methods_swept_rate():
    from perennial.compare import tuning_of

    compared, _, _ = load_methods()
    results = json.loads((ROOT / "bench" / "results" / "cl_quality_sweep.json").read_text())
    chosen = results["sweep_result"]["chosen"]
    for method, overrides in compared.items():
        tuning = tuning_of(overrides)
        assert bench_config(overrides, 0).cit.optim.lr == pytest.approx(float(chosen[tuning])), method


def test_variants_reorder_the_tasks_or_keep_only_the_first_on_unused_records():
    from bench.cl_quality import SWEEP_FILE

    base = bench_config([], 0)
    roles = lambda cfg: [(d.name, d.resolved_role) for d in cfg.data.datasets]  # noqa: E731
    assert [name for name, role in roles(base) if role == "task"] == ["dbpedia", "amazon", "agnews"]
    assert {name for name, role in roles(base) if role == "heldout"} == {"sst2", "boolqa"}
    ordered = bench_config([], 0, {"order": ["agnews", "dbpedia", "amazon"]})
    assert [name for name, role in roles(ordered) if role == "task"] == ["agnews", "dbpedia", "amazon"]
    assert ordered.digest() != base.digest()
    with pytest.raises(ValueError, match="each task"):
        bench_config([], 0, {"order": ["agnews", "dbpedia"]})

    sweep = compare.load_spec(SWEEP_FILE).sweep
    swept = bench_config([], 0, {"sweep": sweep})
    assert [role for _, role in roles(swept)].count("heldout") == 0
    [task] = [d for d in swept.data.datasets if d.resolved_role == "task"]
    [benchmark_source] = next(d for d in base.data.datasets if d.name == "dbpedia").sources
    [source] = task.sources
    # the sweep reads past every record the benchmark reads (its first `limit`), from the same file
    assert task.name == "dbpedia" and source.uri == benchmark_source.uri
    assert source.skip >= benchmark_source.skip + benchmark_source.limit
    assert (source.limit, task.test_fraction) == (sweep["records"], sweep["validation_fraction"])


def test_sweep_picks_each_tuning_methods_best_rate_and_the_lower_on_a_tie():
    from perennial.compare import sweep_recipes, sweep_table

    sweep = {"steps": 5, "rates": {"full": [1e-5, 3e-5], "lora": [1e-3, 3e-3]}}
    jobs = sweep_recipes(sweep)
    assert jobs["lora@0.003"] == ["cit.tuning.method=lora", "cit.optim.lr=0.003", "cit.optim.max_steps=5"]
    runs = [{"method": method, "accuracy_matrix": [[0.1], [score]]}
            for method, score in {"full@1e-05": 0.5, "full@3e-05": 0.7, "lora@0.001": 0.6, "lora@0.003": 0.6}.items()]
    result = sweep_table(runs, sweep)
    assert result["chosen"] == {"full": "3e-05", "lora": "0.001"}
    assert result["scores"]["full"]["1e-05"] == {"validation": 0.5, "zero_shot": 0.1}
    # full's pick is the highest rate tried, lora's the lowest: the report says the best may lie beyond
    from perennial.compare import edge_notes as _edge_notes

    notes = _edge_notes(result)
    assert "- full: the chosen rate 3e-05 is the highest one tried, so the best may lie beyond it." in notes
    assert any(note.startswith("- lora: the chosen rate 0.001 is the lowest") for note in notes)
    inside = sweep_table([*runs, {"method": "full@0.0001", "accuracy_matrix": [[0.1], [0.6]]}],
                         {**sweep, "rates": {"full": [1e-5, 3e-5, 1e-4]}})
    assert _edge_notes(inside) == []


def test_report_assembles_sections_and_names_the_missing(tmp_path):
    (tmp_path / "cl_quality.md").write_text("## Continual-learning quality\n\n| a |\n")
    text = assemble(tmp_path)
    assert text.startswith("# Benchmarks")
    assert "## Continual-learning quality" in text
    assert "python -m bench.engine_throughput` has not been run yet" in text
    assert "cl_quality_sweep" in text  # a side run is missing from a full report
    assert "cl_quality_sweep" not in assemble(tmp_path, quick=True)  # and is no part of the smoke run


def test_make_bench_runs_every_section_the_report_assembles():
    from bench.report import ROOT, SECTIONS

    recipe = (ROOT / "Makefile").read_text().split("\nbench:", 1)[1].split("\n\n", 1)[0]
    commands = [line.strip().removeprefix("$(BIN)/") for line in recipe.splitlines() if line.startswith("\t")]
    for name, command, _ in SECTIONS:
        assert command in commands, f"make bench does not run {command!r}, so {name}.md would go stale"


def test_every_method_override_makes_a_valid_runnable_config():
    from models.cl.registry import check_requirements
    from perennial.config import load_config

    compared, diagnostics, _ = load_methods()
    tunings = set()
    for overrides in [*compared.values(), *diagnostics.values()]:
        cfg = load_config(str(BASE_CONFIG), overrides)
        check_requirements(cfg.cit.methods, cfg.cit.tuning.method, cfg.model.attn_implementation)
        assert cfg.eval.scoring == "options"
        tunings.add(cfg.cit.tuning.method)
    assert tunings == {"full", "attn-proj", "mlp-gate-up", "lora", "mora", "regex"}


def test_diagnostics_train_the_weights_their_names_say_and_are_not_compared():
    from models.tiny import build_tiny_llama, train_tokenizer
    from models.tuning import apply_tuning, trainable_parameter_names
    from perennial.config import load_config

    compared, diagnostics, _ = load_methods()
    assert set(diagnostics) == {"blocks-only", "head-only", "embed-only", "attn-proj+head"}
    assert not set(diagnostics) & set(compared)
    trained = {}
    for name, overrides in diagnostics.items():
        cfg = load_config(str(BASE_CONFIG), overrides)
        model = build_tiny_llama(train_tokenizer(["a b c"], 64), cfg.model.tiny)
        trained[name] = trainable_parameter_names(apply_tuning(model, cfg.cit.tuning))
    assert trained["head-only"] == ["lm_head.weight"]
    assert trained["embed-only"] == ["model.embed_tokens.weight"]
    assert all(name.startswith("model.layers.") for name in trained["blocks-only"])
    assert {name.split(".")[-2] for name in trained["blocks-only"]} >= {"q_proj", "down_proj", "input_layernorm"}
    assert {name.split(".")[-2] for name in trained["attn-proj+head"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "lm_head"}


def test_learned_over_chance_reads_the_diagonal_after_row_zero():
    from perennial.compare import learned_over_chance

    result = {"tasks": ["a", "b"], "accuracy_matrix": [[0.9, 0.9], [0.6, 0.0], [0.0, 0.3]]}
    # R[1][0] = 0.6 and R[2][1] = 0.3 (row 0, before any training, is not a diagonal entry)
    assert learned_over_chance(result, {"a": 0.5, "b": 0.25}) == pytest.approx(((0.6 - 0.5) + (0.3 - 0.25)) / 2)


def test_side_run_renders_under_its_own_name(tmp_path):
    from bench.cl_quality import main
    from bench.common import machine

    report = {"command": "python -m bench.cl_quality", "wall_minutes": 1.0, "workers": 1, "load": "", "machine": machine(),
              "model": "m", "budget": "b", "seeds": [0], "tasks": ["a", "b"], "chance": {"a": 0.5, "b": 0.5}, "quick": False,
              "set": ["cit.optim.lr=0.01"], "methods": {"attn-proj": {}}, "runs": [{**run("attn-proj", 0, 0.6, -0.1, 20.0), "accuracy_matrix": [[0.5, 0.5], [0.8, 0.5], [0.7, 0.9]]}]}
    (tmp_path / "side.json").write_text(json.dumps(report))
    assert main(["--render", "--name", "side", "--output-dir", str(tmp_path)]) == 0
    text = (tmp_path / "side.md").read_text()
    assert text.startswith("## Continual-learning quality: side with cit.optim.lr=0.01")
    assert "| attn-proj |" in text and "Diagnostics" not in text
    assert "Published orderings" not in text  # neither ordering has both of its methods here
    assert not (tmp_path / "cl_quality.md").exists()

    # a diagnostic is labelled as one; a table where nothing learns says its BWT cannot rank anything
    chance_level = [[0.5, 0.5], [0.52, 0.5], [0.5, 0.51]]
    report.update(set=[], methods={"head-only": {}}, runs=[{**report["runs"][0], "method": "head-only", "accuracy_matrix": chance_level}])
    (tmp_path / "diag.json").write_text(json.dumps(report))
    assert main(["--render", "--name", "diag", "--output-dir", str(tmp_path)]) == 0
    text = (tmp_path / "diag.md").read_text()
    assert text.startswith("## Continual-learning quality: diag\n")
    assert "Diagnostics, not methods (configs/cl-benchmark-methods.yaml): head-only = `cit.tuning.method=regex" in text
    assert "no method in this table learns the tasks" in text
    assert "| head-only | 1 | +0.015 | +0.015 | 0.600 | -0.100 |" in text  # one seed: no ± 0.000 that looks like a spread
    assert (tmp_path / "diag_matrices.png").stat().st_size > 1000  # the accuracy-matrix grid

    # a report of runs earlier invocations finished says so, with their summed time, and that the load is today's
    report.update(collected_runs=1, runs_wall_minutes=90.0, load="Measured on a mostly idle machine.",
                  runs=[{**report["runs"][0], "collected": True}])
    (tmp_path / "collected.json").write_text(json.dumps(report))
    assert main(["--render", "--name", "collected", "--output-dir", str(tmp_path)]) == 0
    text = (tmp_path / "collected.md").read_text()
    assert "1 of 1 runs were finished by earlier invocations" in text and "summed wall time is 1.5 h" in text
    assert "At this report (the runs' own load was not recorded): Measured on a mostly idle machine." in text


def test_methods_that_did_not_learn_are_named_beside_the_table(tmp_path):
    from perennial.compare import markdown
    from tasks.compare import machine

    learned = {**run("full", 0, 0.6, -0.3, 500.0), "accuracy_matrix": [[0.5, 0.5], [0.9, 0.5], [0.6, 0.9]]}
    flat = {**run("lora", 0, 0.5, 0.0, 20.0), "accuracy_matrix": [[0.5, 0.5], [0.5, 0.5], [0.5, 0.52]], "attempts": 2}
    rows = aggregate([learned, flat], ["full", "lora"], {"a": 0.5, "b": 0.5})
    report = {"command": "c", "wall_minutes": 1.0, "workers": 1, "load": "", "machine": machine(), "model": "m", "budget": "b",
              "seeds": [0], "tasks": ["a", "b"], "chance": {"a": 0.5, "b": 0.5}, "quick": False, "rows": rows,
              "runs": [learned, flat]}
    text = markdown(report)
    assert "**lora: right after training on a task, within +0.05 of chance**" in text
    assert "| full | 1 | +0.400 | +0.400 |" in text
    assert "1 resumed after an interruption, their wall and CPU time summed over the attempts: lora seed 0 (2)" in text


def test_each_run_records_the_precision_auto_trained_in_and_its_machine(monkeypatch):
    """`precision: auto` is bf16 autocast only on CPUs with native bf16: on others the same config
    trains in fp32, about 3x slower and with other numbers, so the report names it per run."""
    from bench.common import machine_line
    from models import engine
    from tasks.compare import machine, run_precision

    cfg = bench_config([], 0)
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    assert run_precision(cfg) == "bf16 autocast" and machine()["native_bf16"] is True
    assert ", native bf16;" in machine_line(machine())
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    assert machine()["native_bf16"] is False
    assert run_precision(cfg) == "fp32" and run_precision(bench_config(["precision=bf16"], 0)) == "bf16 autocast"
    runs = [{"precision": "bf16 autocast", "machine": {**machine(), "native_bf16": True}},
            {"precision": "fp32", "machine": {**machine(), "native_bf16": False}}]
    assert compare.precisions(runs) == " (bf16 autocast in 1 of 2 runs, fp32 in 1 of 2 runs)"
    assert compare.machines_line({"runs": runs, "machine": {}}).count("1 run on") == 2




def test_added_runs_join_the_published_ones_and_replace_only_what_they_reran():
    from bench.cl_quality import with_earlier_runs

    published = {"runs": [run("full", 0, 0.5, -0.2, 20.0), run("replay-10%", 0, 0.7, -0.05, 15.0)],
                 "method_order": ["full", "replay-10%"], "learning_rates": {"full": 1e-4, "replay-10%": 1e-4},
                 "collected_runs": 2, "methods": {"stale": "summary"}}
    added = {"runs": [{**run("multitask", 0, 0.9, 0.0, 12.0), "wall_s": 60.0},
                      {**run("replay-10%", 0, 0.75, -0.01, 14.0), "wall_s": 120.0}],
             "recipe_order": ["multitask", "replay-10%"], "learning_rates": {"multitask": 1e-4, "replay-10%": 1e-4},
             "collected_runs": 0, "baseline": "multitask"}
    joined = with_earlier_runs(added, published)
    assert joined["recipe_order"] == ["full", "replay-10%", "multitask"]
    assert [(r["recipe"], r["metrics"]["ap"]) for r in joined["runs"]] == [("full", 0.5), ("replay-10%", 0.75), ("multitask", 0.9)]
    assert joined["baseline"] == "full" and joined["collected_runs"] == 1 and "methods" not in joined
    assert joined["runs_wall_minutes"] == pytest.approx(3.0)
    assert set(joined["learning_rates"]) == {"full", "replay-10%", "multitask"}
