"""The benchmark scripts: every published section re-renders from its JSON, the engine benchmark times loops that
train, and the lineage and retention verdicts go whichever way the numbers do."""

import json
from pathlib import Path

import pytest
import torch

from bench import engine_throughput, report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def test_every_section_is_published_with_its_json():
    assert [name for name, _, _ in report.SECTIONS if (RESULTS / f"{name}.json").exists() and (RESULTS / f"{name}.md").exists()] == \
        [name for name, _, _ in report.SECTIONS]


@pytest.mark.parametrize("name", [name for name, _, _ in report.SECTIONS] +
                         [name for name, _, _ in report.DEVICE_SECTIONS if (RESULTS / f"{name}.json").exists()])
def test_every_published_section_rerenders_from_its_json(name, tmp_path):
    """Each committed <name>.md is what its benchmark's markdown() renders from <name>.json (`python -m bench.report
    --render`): the same text where the benchmark words it; the CL comparisons, worded by `perennial compare`, which has
    gained sections since, give every number of each published table row and line, in order."""
    from tests.test_compare import _each_found_in_order, _numbered_lines

    published, rendered = (RESULTS / f"{name}.md").read_text(), report.render(name)
    if name.startswith("cl_quality"):
        assert _numbered_lines(published) and _each_found_in_order(_numbered_lines(published), _numbered_lines(rendered))
    else:
        assert rendered.rstrip() == published.rstrip()
    (tmp_path / f"{name}.json").write_text((RESULTS / f"{name}.json").read_text())
    assert report.main(["--results", str(tmp_path), "--output", str(tmp_path / "B.md"), "--render", name]) == 0
    assert (tmp_path / f"{name}.md").read_text() == rendered.rstrip() + "\n"


def test_engine_benchmark_quick_runs_end_to_end_with_the_fresh_process_runs_stubbed(tmp_path, monkeypatch):
    """`--quick`: the plan (runs, memory rows, settings), the report and its section; every run needs a fresh
    process, so the child runs are stubbed."""
    jobs = []

    def child(module, job):
        jobs.append(job)
        if job["run"] == "throughput":
            return {"cpu": 100.0, "wall": 90.0, "minor_faults_per_step": 5.0, "optimizer_ms_per_step": 40.0, "gflop_per_token": 0.8}
        if job["run"] == "peak":
            gemms = [{"in": 4, "out": 8, "gemm": "forward", "count": 2, "gflop": 0.1, "gflops": rate} for rate in (90.0, 80.0)]
            return {dtype: {"tokens": job["tokens"], "peak_gflops": 90.0, "step_mix_gflops": 85.0, "gemms": gemms} for dtype in ("bf16", "fp32")}
        if job["run"] == "profile":
            return {"precision": "bf16", "step_ms": 100.0, "ms": dict.fromkeys(engine_throughput.CATEGORIES, 10.0), "matmul_gflops": 80.0,
                    "flops": {"matmul_params": 10, "trained_matmul_params": 10, "attention": 2, "total": 62},
                    "minor_faults": 1234, "unprofiled_step_before": {"ms": 90.0, "minor_faults": 0}}
        return {"kind": job["kind"], "method": job["name"], "tuning": job["name"], "trainable_params": 1, "rss_before_model_mib": 500.0,
                "training_peak_above_baseline_mib": 200.0, "steps": job["steps"]}

    monkeypatch.setattr(engine_throughput, "child", child)
    assert engine_throughput.main(["--quick", "--output", str(tmp_path / "real.json")]) == 0
    real = json.loads((tmp_path / "real.json").read_text())
    assert [job["name"] for job in jobs if job["run"] == "throughput"] == ["engine bf16", "engine fp32"]
    assert [job["run"] for job in jobs if job["run"] in ("peak", "profile")] == ["peak", "profile"]  # one round
    assert all(job["threads"] == 2 for job in jobs)
    assert list(real["tokens_per_s"]) == ["engine bf16", "engine fp32"] and real["ratios"]["engine / plain (bf16)"] is None
    assert (real["settings"]["steps"], real["settings"]["warmup_steps_excluded"], real["settings"]["threads"]) == (3, 1, 2)
    assert [(row["kind"], row["method"], row["steps"]) for row in real["peak_rss"]] == [("tuning", "full", 2), ("tuning", "attn-proj", 2), ("cl", "lwf", 2)]
    assert (tmp_path / "real.md").read_text() == engine_throughput.markdown(real).rstrip() + "\n"
    real["machine"]["native_bf16"] = True  # the bf16 speed targets hold where bf16 is native
    assert "| engine bf16 / engine fp32 (full) | 1.00x | >= 1.5x: NOT met |" in engine_throughput.markdown(real)
    # 90 tokens/s x 0.8 GFLOP = 72 GFLOP/s, 0.80 of the 90 GFLOP/s peak
    assert "| engine / matmul peak | 0.80 (target >= 0.8: met) | 0.80 |" in engine_throughput.markdown(real)
    real["machine"]["native_bf16"] = False  # emulated bf16: its speed says nothing of the engine, the targets do not apply
    assert "| engine bf16 / engine fp32 (full) | 1.00x | n/a: no native bf16 here (emulated; precision auto trains fp32) |" \
        in engine_throughput.markdown(real)
    assert "| engine / matmul peak | 0.80 (target n/a: no native bf16 here (emulated; precision auto trains fp32)) | 0.80 |" \
        in engine_throughput.markdown(real)
    assert "| engine / Trainer (bf16) | n/a | >= 1.0x: not measured |" in engine_throughput.markdown(real)  # like for like: it holds
    assert "| engine bf16 | full | 90 | 100 | 5 | 72 | 0.80 | 40 |" in engine_throughput.markdown(real)
    assert "The profiled step took 1,234 minor page faults, the unprofiled step before it 0 in 90 ms" in engine_throughput.markdown(real)


def test_engine_benchmark_compare_runs_two_rows_in_alternating_order_and_prints_their_ratio(monkeypatch, capsys):
    jobs = []

    def child(module, job):
        jobs.append(job["name"])
        return {"wall": 120.0 if "compile" in job["name"] else 100.0, "cpu": 1.0, "optimizer_ms_per_step": 30.0}

    monkeypatch.setattr(engine_throughput, "child", child)
    assert engine_throughput.main(["--compare", "engine bf16 + torch.compile", "engine bf16", "--rounds", "3"]) == 0
    assert jobs == ["engine bf16 + torch.compile", "engine bf16", "engine bf16", "engine bf16 + torch.compile",
                    "engine bf16 + torch.compile", "engine bf16"]
    assert "engine bf16 + torch.compile / engine bf16: 1.20x (medians 120 and 100 tokens/s over 3 rounds, 2 torch threads); " \
        "optimizer step 30 and 30 ms" in capsys.readouterr().out


def test_optimizer_seconds_times_every_optimizer_step_once_even_when_a_wrapper_steps_the_one_it_holds():
    """The engine's, the plain loop's and Trainer's optimizer steps are timed alike: accelerate's wrapper steps the
    AdamW it holds, and that step counts once; the hooks go when the block ends."""
    import time

    class Slow(torch.optim.SGD):
        def step(self, closure=None):
            time.sleep(0.1)
            return super().step(closure)

    class Wrapper(torch.optim.Optimizer):  # as accelerate's AcceleratedOptimizer
        def __init__(self, inner):
            super().__init__(inner.param_groups, {})
            self.inner = inner

        def step(self, closure=None):
            return self.inner.step(closure)

    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.ones(3)
    optimizer = Wrapper(Slow([weight], lr=0.1))
    with engine_throughput.optimizer_seconds() as spent:
        optimizer.step()
        optimizer.step()
    assert 0.2 <= spent[0] < 0.35  # two steps of 0.1 s; counted twice each, it would be 0.4
    optimizer.step()
    assert spent[0] < 0.35 and torch.allclose(weight.detach(), torch.full((3,), 0.7))


def test_model_flops_count_each_linear_once_and_attention_per_the_docstring():
    """4·N + 2·N_trained + 12·layers·seq·d, N over the Linear layers: a tied head once, the embedding none."""
    from tests.tiny_models import tiny_model

    model = tiny_model("qwen2", vocab_size=48)  # tied head; hidden 32, MLP 64, 4 query / 2 KV heads of 8, 2 layers
    n = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64) + 32 * 48
    assert engine_throughput.flops_per_token(model, 10) == {"matmul_params": n, "trained_matmul_params": n,
                                                            "attention": 12 * 2 * 10 * 32, "total": 6 * n + 12 * 2 * 10 * 32}
    for name, p in model.named_parameters():
        p.requires_grad_("q_proj" in name)
    assert engine_throughput.flops_per_token(model, 10)["total"] == 4 * n + 2 * (2 * 32 * 32) + 12 * 2 * 10 * 32
    rates = engine_throughput.gemm_rates({(32, 48): [1, 1]}, 16, torch.float32, min_seconds=0.0)
    assert [row["gemm"] for row in rates["gemms"]] == ["forward", "input gradient", "weight gradient"]
    assert rates["peak_gflops"] >= rates["step_mix_gflops"] > 0


def test_the_step_profile_groups_ops_by_name_caller_and_vocabulary_wide_inputs():
    from types import SimpleNamespace as Event

    step = Event(name="Optimizer.step#AdamW.step", cpu_parent=None, input_shapes=[])
    category = lambda name, parent=None, shapes=(): engine_throughput.op_category(Event(name=name, cpu_parent=parent, input_shapes=list(shapes)), 48)  # noqa: E731
    assert [category("aten::mul_", step), category("aten::mm", shapes=[[8, 48], [48, 4]]), category("aten::_log_softmax", shapes=[[8, 48]]),
            category("aten::bmm"), category("aten::_to_copy", shapes=[[48, 4]]), category("aten::silu")] == \
        [engine_throughput.CATEGORIES[i] for i in (2, 0, 4, 1, 3, 5)]


@pytest.mark.usefixtures("single_torch_thread")
@pytest.mark.parametrize("name", [name for name in engine_throughput.RUNS if "compile" not in name])  # a minute to compile
def test_each_loop_the_engine_benchmark_times_trains_every_step(name):
    """The loops each fresh process times, on a tiny Llama: one stamp per optimizer step, and the weights move."""
    import torch

    from models.tuning import apply_tuning
    from perennial.config import TuningConfig
    from tests.tiny_models import tiny_model

    tuning, run = engine_throughput.RUNS[name]
    model = apply_tuning(tiny_model("llama", vocab_size=48), TuningConfig(method=tuning))
    before = [p.detach().float().clone() for p in model.parameters()]
    examples = [{"input_ids": [(7 * i + j) % 48 for j in range(engine_throughput.REAL.block)]} for i in range(16)]
    stamps = run(model, examples, 0, 3)
    assert len(stamps) == 3 and stamps == sorted(stamps)
    assert any(not torch.equal(a, p.detach().float()) for a, p in zip(before, model.parameters()))


def test_real_model_engine_section_renders_from_the_committed_numbers():
    report = json.loads((ROOT / "bench" / "results" / "engine_throughput.json").read_text())
    text = engine_throughput.markdown(report)
    assert text.startswith("## Training engine\n") and report["command"] in text
    bf16_over_fp32 = report["ratios"]["engine bf16 / engine fp32 (full)"]
    assert f"| engine bf16 / engine fp32 (full) | {bf16_over_fp32:.2f}x |" in text
    assert {row["method"] for row in report["peak_rss"]} >= {"full", "attn-proj", "ewc", "lwf", "seekr"}


def test_lineage_bench_judges_cost_and_ap_whichever_way_they_go():
    """bench/lineage.py's verdicts: night N against night 1 continuing (every cost key), the final AP gap, and the
    'same scores' line only where every cell the continued lineage measured equals the from-base one."""
    from bench import lineage

    def night(mode, n, tokens, cpu, ap, matrix):
        return {"mode": mode, "night": n, "trained": [], "cit_tokens": tokens, "cit_train_s": cpu, "cpu_s": cpu, "wall_s": cpu,
                "ap": ap, "bwt": None, "capitals": 0.0, "capitals_base": 0.7, "accuracy_matrix": matrix}

    nights = [night("continue", 1, 100, 60, 0.5, [[0.0], [0.5]]), night("from base", 1, 100, 60, 0.5, [[0.0], [0.5]]),
              night("continue", 2, 110, 70, 0.6, [[0.0, None], [0.5, 0.1], [0.4, 0.8]]),
              night("from base", 2, 210, 130, 0.6, [[0.0, 0.0], [0.5, 0.1], [0.4, 0.8]])]
    verdict = lineage.verdicts(nights)
    assert verdict["cost"]["holds"] and verdict["ap"]["holds"] and verdict["from_base_cost_ratio"]["cit_tokens"] == 2.1
    from bench.common import machine

    report = {"command": "x", "measured_at": "t", "machine": machine(), "load": "", "description": "", "wall_minutes": 1.0,
              "nights": nights, "verdicts": verdict}
    assert "score the same after every night" in lineage.markdown(report)

    nights[2].update(cpu_s=90, ap=0.55, accuracy_matrix=[[0.0, None], [0.5, 0.1], [0.3, 0.8]])
    verdict = lineage.verdicts(nights)
    assert not verdict["cost"]["holds"] and not verdict["ap"]["holds"]  # CPU x1.5; AP gap -0.05
    assert "score the same" not in lineage.markdown({**report, "nights": nights, "verdicts": verdict})


def test_retention_bench_judges_the_bound_and_the_stage_size_whichever_way_they_go():
    """bench/retention.py's verdicts: S3 with the policy on against what the kept versions reference plus one checkpoint
    in flight and against 3 full checkpoints; what each night adds with the policy off against 0.4 of one."""
    from bench import retention
    from bench.common import machine

    full = 1000

    def night(policy, n, s3, added, needed):
        return {"policy": policy, "night": n, "s3_bytes": s3, "s3_objects": 1, "added_bytes": added, "local_bytes": 0,
                "mlflow_bytes": 2 * full, "gc": None, "needed": {"bytes": needed, "mlflow_bytes": 2 * full, "full_checkpoint": full}}

    nights = [night("policy off", 1, 2000, 2000, 2000), night("policy off", 2, 2200, 200, 2200), night("policy off", 3, 2400, 200, 2400),
              night("policy on", 3, 2300, 100, 2300)]
    verdict = retention.verdicts(nights)
    assert verdict["bound"]["holds"] and verdict["bound"]["holds_3x"] and verdict["stage"]["holds"]
    assert verdict["stage"]["max_x_full"] == 0.2 and verdict["bound"]["off_with_mlflow"] == 4.4
    report = {"command": "x", "measured_at": "t", "machine": machine(), "description": "", "nights": nights, "verdicts": verdict}
    assert "holds" in retention.markdown(report) and "does not hold" not in retention.markdown(report)

    nights[-1].update(s3_bytes=3500)  # over needed + one checkpoint, and over 3 checkpoints
    nights[2].update(added_bytes=500)
    verdict = retention.verdicts(nights)
    assert not verdict["bound"]["holds"] and not verdict["bound"]["holds_3x"] and not verdict["stage"]["holds"]
    assert "does not hold" in retention.markdown({**report, "nights": nights, "verdicts": verdict})


def test_the_matmul_peak_reads_the_model_config_outside_the_meta_device(tmp_path, monkeypatch):
    """On a machine without the converted model, `smollm2()` converts the GGUF file, whose from_pretrained refuses to
    run under the meta device the peak builds its shapes on: the first benchmark on a fresh machine failed so."""
    from tests.tiny_models import tiny_model

    tiny_model("llama", vocab_size=48).save_pretrained(tmp_path)

    def converted_model_folder():
        assert torch.empty(0).device.type != "meta", "smollm2() ran under the meta device"
        return tmp_path

    monkeypatch.setattr(engine_throughput, "smollm2", converted_model_folder)
    rates = engine_throughput.peak_child(tokens=16, min_seconds=0.0)
    assert rates["bf16"]["peak_gflops"] > 0 and rates["fp32"]["peak_gflops"] > 0
