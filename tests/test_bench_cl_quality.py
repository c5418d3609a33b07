"""The CL quality benchmark's aggregation and its check of the published orderings."""

import json
import math

import pytest

from pathlib import Path

from bench.cl_quality import aggregate, load_methods, orderings
from bench.report import assemble

ROOT = Path(__file__).resolve().parents[1]


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
    assert "(gap -0.023, margin 0.030: the larger of the seed std and the test sets' resolution)" in orderings(near)[0]
    assert "**holds**" in orderings(near)[0]
    behind = aggregate([run("seekr-1%", 0, 0.46, -0.065, 50.0), run("replay-10%", 0, 0.5, -0.037, 20.0)], ["seekr-1%", "replay-10%"])
    assert "**does not hold**" in orderings(behind)[0]


def test_every_issue_method_runs_and_the_five_compared_ones_with_three_seeds():
    from bench.cl_quality import run_pairs

    methods, _, _ = load_methods()
    assert set(methods) == {"full", "attn-proj", "mlp-gate-up", "lora", "mora", "replay-1%", "replay-10%", "ewc", "lwf", "seekr-1%", "olora"}
    pairs = run_pairs(list(methods), None)
    seeds = {method: sorted(seed for m, seed in pairs if m == method) for method in methods}
    assert all(seeds[method] == [0, 1, 2] for method in ("full", "attn-proj", "lora", "replay-10%", "seekr-1%"))
    assert all(len(seeds[method]) >= 1 for method in methods)
    assert run_pairs(["full", "ewc"], [3]) == [("full", 3), ("ewc", 3)]  # --seeds: those seeds for every method


def test_every_method_uses_its_tuning_methods_swept_rate():
    from bench.cl_quality import bench_config, tuning_of

    compared, _, _ = load_methods()
    results = json.loads((ROOT / "bench" / "results" / "cl_quality_sweep.json").read_text())
    chosen = results["sweep_result"]["chosen"]
    for method, overrides in compared.items():
        tuning = tuning_of(overrides)
        assert bench_config(overrides, 0).cit.optim.lr == pytest.approx(float(chosen[tuning])), method


def test_variants_reorder_the_tasks_or_keep_only_the_first_on_unused_records():
    from bench.cl_quality import bench_config, load_sweep

    base = bench_config([], 0)
    roles = lambda cfg: [(d.name, d.resolved_role) for d in cfg.data.datasets]  # noqa: E731
    assert [name for name, role in roles(base) if role == "task"] == ["dbpedia", "amazon", "agnews"]
    assert {name for name, role in roles(base) if role == "heldout"} == {"sst2", "boolqa"}
    ordered = bench_config([], 0, {"order": ["agnews", "dbpedia", "amazon"]})
    assert [name for name, role in roles(ordered) if role == "task"] == ["agnews", "dbpedia", "amazon"]
    assert ordered.digest() != base.digest()
    with pytest.raises(ValueError, match="each task"):
        bench_config([], 0, {"order": ["agnews", "dbpedia"]})

    sweep = load_sweep()
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
    from bench.cl_quality import sweep_jobs, sweep_table

    sweep = {"steps": 5, "rates": {"full": [1e-5, 3e-5], "lora": [1e-3, 3e-3]}}
    jobs = sweep_jobs(sweep)
    assert jobs["lora@0.003"] == ["cit.tuning.method=lora", "cit.optim.lr=0.003", "cit.optim.max_steps=5"]
    runs = [{"method": method, "accuracy_matrix": [[0.1], [score]]}
            for method, score in {"full@1e-05": 0.5, "full@3e-05": 0.7, "lora@0.001": 0.6, "lora@0.003": 0.6}.items()]
    result = sweep_table(runs, sweep)
    assert result["chosen"] == {"full": "3e-05", "lora": "0.001"}
    assert result["scores"]["full"]["1e-05"] == {"validation": 0.5, "zero_shot": 0.1}
    # full's pick is the highest rate tried, lora's the lowest: the report says the best may lie beyond
    from bench.cl_quality import _edge_notes

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
    from bench.cl_quality import BASE_CONFIG
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
    from bench.cl_quality import BASE_CONFIG
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
    from bench.cl_quality import learned_over_chance

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


def test_finished_runs_are_collected_by_config_digest(tmp_path, monkeypatch):
    """A killed benchmark resumes: finished runs whose config matches are reused, others are not."""
    import mlflow

    from bench.cl_quality import BASE_CONFIG, WHERE_KEYS, finished_runs
    from perennial.config import load_config
    from tasks.runtime import _flatten

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PERENNIAL_S3_ENDPOINT", "http://127.0.0.1:1")
    jobs = {"full": [], "lora": ["cit.tuning.method=lora"]}
    experiment = mlflow.create_experiment(load_config(str(BASE_CONFIG)).tracking.experiment, artifact_location=str(tmp_path / "art"))

    def finished(overrides, ap):
        where = [f"{key}=/elsewhere/{key}" if key == "work_dir" else f"{key}=http://127.0.0.1:9" if "endpoint" in key or "uri" in key
                 else f"{key}=other-bucket" for key in WHERE_KEYS]
        cfg = load_config(str(BASE_CONFIG), [*overrides, *where])
        with mlflow.start_run(experiment_id=experiment, run_name="cl-benchmark", tags={"config_digest": cfg.digest()}):
            mlflow.log_params({k: v for k, v in _flatten(cfg.model_dump(mode="json")).items() if k in (*WHERE_KEYS, "seed")})
            mlflow.log_metrics({"ap": ap, "bench/attempts": 2})
            mlflow.log_dict({"tasks": ["a"], "rows": [[0.1], [ap]]}, "report/accuracy_matrix.json")

    finished(["cit.tuning.method=lora", "seed=1"], 0.4)
    finished(["cit.tuning.method=lora", "seed=1", "cit.optim.max_steps=7"], 0.9)  # other sizes: not this benchmark
    finished(["seed=5"], 0.3)  # a seed not asked for
    [run] = finished_runs(jobs, [(method, seed) for seed in (0, 1) for method in jobs])
    assert (run["method"], run["seed"], run["metrics"]["ap"], run["accuracy_matrix"]) == ("lora", 1, 0.4, [[0.1], [0.4]])
    assert repr(run["attempts"]) == "2"  # a count, though MLflow stores it as a float


def test_methods_that_did_not_learn_are_named_beside_the_table(tmp_path):
    from bench.cl_quality import markdown
    from bench.common import machine

    learned = {**run("full", 0, 0.6, -0.3, 500.0), "accuracy_matrix": [[0.5, 0.5], [0.9, 0.5], [0.6, 0.9]]}
    flat = {**run("lora", 0, 0.5, 0.0, 20.0), "accuracy_matrix": [[0.5, 0.5], [0.5, 0.5], [0.5, 0.52]], "attempts": 2}
    rows = aggregate([learned, flat], ["full", "lora"], {"a": 0.5, "b": 0.5})
    report = {"command": "c", "wall_minutes": 1.0, "workers": 1, "load": "", "machine": machine(), "model": "m", "budget": "b",
              "seeds": [0], "tasks": ["a", "b"], "chance": {"a": 0.5, "b": 0.5}, "quick": False, "methods": rows,
              "orderings": [], "runs": [learned, flat]}
    text = markdown(report)
    assert "**lora: right after training on a task, within +0.05 of chance**" in text
    assert "| full | 1 | +0.400 | +0.400 |" in text
    assert "1 resumed after an interruption, their wall and CPU time summed over the attempts: lora seed 0 (2)" in text


def _results_file(path, runs, model="m", budget="b", variant=None, precision="bf16 autocast"):
    path.write_text(json.dumps({"model": model, "budget": budget, "variant": variant,
                                "runs": [{"precision": precision, **r} for r in runs]}))
    return path


def test_published_runs_count_only_with_this_invocations_recipe(tmp_path):
    """A fresh clone resumes from the committed results: a run counts when its method's overrides, the
    model, the budget, the task order and the precision it trained in are this invocation's, and the
    first file's run of a pair wins."""
    from bench.cl_quality import published_runs, recipe_digest

    recipes = {"full": [], "lora": ["cit.tuning.method=lora", "cit.optim.lr=3.0e-3"]}
    lora = {**run("lora", 0, 0.5, -0.2, 30.0), "overrides": recipes["lora"]}
    first = _results_file(tmp_path / "a.json", [
        {**run("full", 0, 0.6, -0.1, 30.0), "overrides": []},
        lora,
        {**run("lora", 1, 0.5, -0.2, 30.0), "overrides": ["cit.tuning.method=lora", "cit.optim.lr=1.0e-2"]},  # another rate
        {**run("ewc", 0, 0.5, -0.2, 30.0), "overrides": ["cit.methods=[{name: ewc}]"]},  # not a method of this invocation
    ])
    second = _results_file(tmp_path / "b.json", [{**run("full", 0, 0.1, -0.9, 30.0), "overrides": []},
                                                 {**run("full", 2, 0.7, -0.1, 30.0), "overrides": []},
                                                 # a config key the overrides do not show changed since (e.g. the DAP steps)
                                                 {**run("full", 6, 0.7, -0.1, 30.0), "overrides": [], "recipe_digest": "0" * 64},
                                                 {**run("full", 7, 0.7, -0.1, 30.0), "overrides": [], "recipe_digest": recipe_digest([], 7, None)}])
    other_budget = _results_file(tmp_path / "c.json", [{**run("full", 3, 0.7, -0.1, 30.0), "overrides": []}], budget="b2")
    other_order = _results_file(tmp_path / "d.json", [{**run("full", 4, 0.7, -0.1, 30.0), "overrides": []}],
                                variant={"order": ["b", "a"]})
    # `precision: auto` trains in fp32 on a CPU without native bf16: those runs never join bf16 ones
    fp32 = _results_file(tmp_path / "e.json", [{**run("full", 5, 0.7, -0.1, 30.0), "overrides": []}], precision="fp32")

    found = published_runs([first, second, other_budget, other_order, fp32, tmp_path / "missing.json"], recipes, None, "m", "b",
                           "bf16 autocast")
    assert sorted((r["method"], r["seed"], r["metrics"]["ap"]) for r in found) == [("full", 0, 0.6), ("full", 2, 0.7), ("full", 7, 0.7),
                                                                                 ("lora", 0, 0.5)]
    assert all(r["collected"] for r in found)
    assert published_runs([other_order], recipes, {"order": ["b", "a"]}, "m", "b", "bf16 autocast")[0]["seed"] == 4
    assert published_runs([fp32], recipes, None, "m", "b", "fp32")[0]["seed"] == 5


@pytest.mark.integration
@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "datasets").is_dir(), reason="../shared/datasets is not available")
def test_a_run_of_more_seeds_adds_to_the_published_table(tmp_path, monkeypatch, capsys):
    """`--keep-published --seeds 1` after a seed-0 table keeps seed 0 beside seed 1, and a fresh state dir
    with the published runs reruns nothing (real services start). Without the flag the report is this
    invocation's runs alone, and it names the published runs it leaves out."""
    import bench.cl_quality as clq

    monkeypatch.setattr(clq, "trainable_params", lambda jobs, extra: dict.fromkeys(jobs))  # loads the 135M model

    def run_all(*args, **kwargs):
        raise AssertionError("every asked run is published: nothing may run")

    monkeypatch.setattr(clq, "run_all", run_all)
    cfg = clq.bench_config([], 0)
    model, budget = clq._model_line(cfg), clq._budget_line(cfg, False)
    matrix = [[0.1, 0.2, 0.3], [0.9, 0.2, 0.3], [0.5, 0.9, 0.3], [0.5, 0.5, 0.9]]

    def result(method, seed, ap):
        base = run(method, seed, ap, -0.2, 40.0)
        overrides = clq.load_methods()[0][method]
        return {**base, "overrides": overrides, "recipe_digest": clq.recipe_digest(overrides, seed, None),
                "tasks": ["dbpedia", "amazon", "agnews"], "accuracy_matrix": matrix,
                "metrics": {**base["metrics"], "fwt": 0.1, "forgetting_max": 0.4}, "wall_s": 60.0}

    here = clq.run_precision(cfg)
    _results_file(tmp_path / "cl_quality.json", [result("full", 0, 0.6), result("lora", 0, 0.5)], model, budget, precision=here)
    _results_file(tmp_path / "elsewhere.json", [result("full", 1, 0.7)], model, budget, precision=here)
    where = ["--output-dir", str(tmp_path), "--state-dir", str(tmp_path / "state")]
    argv = ["--keep-published", "--methods", "full", "--seeds", "0", "1", "--runs-from", str(tmp_path / "elsewhere.json"), *where]
    assert clq.main(argv) == 0
    report = json.loads((tmp_path / "cl_quality.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in report["runs"]) == [("full", 0), ("full", 1), ("lora", 0)]
    assert report["seeds"] == [0, 1] and report["collected_runs"] == 3 and list(report["methods"]) == ["full", "lora"]
    assert report["methods"]["full"]["ap"]["n"] == 2 and math.isclose(report["methods"]["full"]["ap"]["mean"], 0.65)
    assert report["rerun_command"] is None  # the kept lora run is not one of the pairs asked for, nor is the table the default set
    assert f"precision auto ({here} in 3 of 3 runs)" in (tmp_path / "cl_quality.md").read_text()

    capsys.readouterr()
    assert clq.main(["--no-run", "--methods", "full", "--seeds", "1", "--runs-from", str(tmp_path / "elsewhere.json"), *where]) == 0
    assert "holds 2 runs of this recipe that this report leaves out (full seed 0, lora seed 0); --keep-published keeps them" in capsys.readouterr().out
    report = json.loads((tmp_path / "cl_quality.json").read_text())
    assert [(r["method"], r["seed"]) for r in report["runs"]] == [("full", 1)]
    assert report["rerun_command"] == "python -m bench.cl_quality --methods full --seeds 1 --output-dir {0} --state-dir {0}/state".format(tmp_path)


def test_the_report_names_the_command_that_reruns_its_table():
    from bench.cl_quality import _rerun_argv

    argv = ["--no-run", "--threads", "2", "--keep-published", "--runs-from", "a.json", "b.json", "--methods", "full", "lora", "--seeds", "1"]
    assert _rerun_argv(argv, ("--no-run", "--keep-published", "--runs-from")) == ["--threads", "2", "--methods", "full", "lora", "--seeds", "1"]
    assert _rerun_argv(argv, ("--no-run", "--keep-published", "--runs-from", "--methods", "--seeds")) == ["--threads", "2"]


def test_each_run_records_the_precision_auto_trained_in_and_its_machine(monkeypatch):
    """`precision: auto` is bf16 autocast only on CPUs with native bf16: on others the same config
    trains in fp32, about 3x slower and with other numbers, so the report names it per run."""
    from bench import cl_quality as clq
    from bench.common import machine_line
    from models import engine

    cfg = clq.bench_config([], 0)
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    assert clq.run_precision(cfg) == "bf16 autocast" and clq.machine()["native_bf16"] is True
    assert ", native bf16;" in machine_line(clq.machine())
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    assert clq.machine()["native_bf16"] is False
    assert clq.run_precision(cfg) == "fp32" and clq.run_precision(clq.bench_config(["precision=bf16"], 0)) == "bf16 autocast"
    runs = [{"precision": "bf16 autocast", "machine": {**clq.machine(), "native_bf16": True}},
            {"precision": "fp32", "machine": {**clq.machine(), "native_bf16": False}}]
    assert clq._precisions(runs) == " (bf16 autocast in 1 of 2 runs, fp32 in 1 of 2 runs)"
    assert clq._machines_line({"runs": runs, "machine": {}}).count("1 run on") == 2


def test_an_interrupted_run_resumes_under_its_key_and_its_cost_sums_the_attempts(tmp_path, monkeypatch):
    """A benchmark killed mid-run resumes that run in the next invocation: the run key follows what the run
    computes, not its work dir or ports, so the flow finds its parent run and committed stages again; the
    interrupted attempt's wall time is recorded on the parent run and summed into the finished run's cost."""
    import time

    import mlflow
    from mlflow.tracking import MlflowClient

    import flows.continual_retrain
    from bench import cl_quality as clq
    from perennial.storage import ObjectStore
    from perennial.tracking import LINEAGE_TAG, RUN_KEY_TAG

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(ObjectStore, "delete_prefix", lambda self, prefix: None)  # the run's files: none here
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unused")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unused")
    # The experiment the bench config names, where the flow creates its parent runs and _log_attempt looks.
    experiment = mlflow.create_experiment(clq.bench_config([], 0, None, []).tracking.experiment, artifact_location=str(tmp_path / "art"))
    keys, parents = [], {}

    def flow(config, run_key):  # the flow's preflight: one parent run per key, reused on a resume
        keys.append(run_key)
        if run_key not in parents:
            parents[run_key] = MlflowClient().create_run(experiment, tags={RUN_KEY_TAG: run_key, LINEAGE_TAG: clq.bench_config([], 0, None, []).tracking.registered_model}).info.run_id
        if len(keys) == 1:
            time.sleep(0.5)
            raise KeyboardInterrupt("signal SIGTERM")
        return {"mlflow_run_id": parents[run_key], "s3_prefix": "s3://cl-quality/runs/x", "tasks": ["a"],
                "accuracy_matrix": [[0.1], [0.9]], "metrics": {}, "general_tasks": {}}

    monkeypatch.setattr(flows.continual_retrain, "continual_retrain", flow)
    overrides = ["cit.tuning.method=lora"]
    monkeypatch.setenv("PERENNIAL_BENCH_WORK", str(tmp_path / "first-invocation"))
    with pytest.raises(KeyboardInterrupt):
        clq.run_one("lora", 0, overrides)
    monkeypatch.setenv("PERENNIAL_BENCH_WORK", str(tmp_path / "second-invocation"))
    result = clq.run_one("lora", 0, overrides)

    assert keys[0] == keys[1] != f"cl-benchmark-{clq.recipe_digest([], 0, None)[:16]}"  # one key per recipe, full has another
    [recorded] = MlflowClient().get_metric_history(parents[keys[0]], "bench/attempt_wall_s")
    assert recorded.value >= 0.5
    assert result["attempts"] == 2 and result["wall_s"] >= recorded.value
    assert MlflowClient().get_run(parents[keys[0]]).data.metrics["bench/attempts"] == 2  # what finished_runs collects
    line = clq._runs_line({"runs": [result, {**result, "method": "full", "attempts": 1}]})
    assert "1 resumed after an interruption, their wall and CPU time summed over the attempts: lora seed 0 (2)" in line
