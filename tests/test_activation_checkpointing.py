"""`optim.activation_checkpointing` recomputes the transformer blocks in backward and changes nothing else.

In fp32 on the CPU the recomputed forward is the same sequence of operations on the same inputs
(non-reentrant `torch.utils.checkpoint` restores the RNG and autocast state of the first pass),
so the losses and weights must be bit-identical to a run without it, hence `==` and
`torch.equal`, no tolerance. The control counts the calls of the first block's MLP: one per
micro-batch without checkpointing, two with it. They are counted by a forward *pre*-hook: the
recomputation stops as soon as it has rebuilt the last tensor backward needs (checkpoint's
early stop), which is inside the MLP's down projection, so a post-forward hook on the MLP never
sees the second call.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from models.engine import train
from models.tuning import apply_tuning
from perennial.config import Config, OptimConfig, TuningConfig, build_config
from tasks.base_model import base_model_key
from tasks.dap import dap_key
from tasks.ingest import DatasetRef
from tasks.runtime import RunContext
from tests import tiny_models

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CFG = OptimConfig(lr=3e-3, max_steps=4, batch_size=4, grad_accum=2, warmup_steps=1, weight_decay=0.01)
SEED = 3


def _examples(count: int = 16, length: int = 12) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for index in range(count):
        ids = torch.randint(3, 48, (length - index % 3,), generator=generator).tolist()  # unequal lengths: padding
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return rows


def _run(method: str, checkpointing: bool):
    """Train a fresh seeded tiny Llama tuned by ``method``; returns (losses, trainable weights, MLP forwards, flags)."""
    model = apply_tuning(tiny_models.tiny_model("llama", vocab_size=48, num_key_value_heads=4, max_position_embeddings=64),
                         TuningConfig(method=method, r=4))
    inner = next(m for m in model.modules() if hasattr(m, "is_activation_checkpointing"))
    mlp = next(m for name, m in model.named_modules() if name.endswith("layers.0.mlp"))
    forwards = []
    hook = mlp.register_forward_pre_hook(lambda *_: forwards.append(1))
    seen_on = []
    result = train(model, _examples(), CFG.model_copy(update={"activation_checkpointing": checkpointing}), seed=SEED,
                   pad_token_id=0, on_step_end=lambda step, m: seen_on.append(inner.is_activation_checkpointing))
    hook.remove()
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return result.losses, weights, len(forwards), seen_on, inner.is_activation_checkpointing


@pytest.mark.parametrize("method", ["full", "lora", "attn-proj", "mlp-gate-up"])
def test_checkpointing_gives_the_same_losses_and_weights(method):
    plain_losses, plain_weights, plain_forwards, plain_on, _ = _run(method, checkpointing=False)
    losses, weights, forwards, on, after = _run(method, checkpointing=True)

    # The control: the flag turned checkpointing on for the training steps only, and every
    # micro-batch ran the block's MLP twice (forward, then the recomputation in backward).
    micro_batches = CFG.max_steps * CFG.grad_accum
    assert plain_on == [False] * CFG.max_steps and plain_forwards == micro_batches
    assert on == [True] * CFG.max_steps and forwards == 2 * micro_batches
    assert not after  # off again once train returns: the caller's model is as it was

    assert losses == plain_losses  # bit for bit
    assert len(set(losses)) > 1 and losses[-1] < losses[0]  # it did train
    assert weights.keys() == plain_weights.keys() and weights
    if method != "full":  # the frozen-embedding methods: the input embeddings got no gradient
        assert not any("embed_tokens" in name for name in weights)
    for name, expected in plain_weights.items():
        assert torch.equal(weights[name], expected), name


def test_checkpointing_is_off_by_default_and_not_part_of_a_runs_identity():
    assert OptimConfig().activation_checkpointing is False
    on = ["model.pretrain.activation_checkpointing=true", "dap.optim.activation_checkpointing=true",
          "cit.optim.activation_checkpointing=true"]
    defaults = Config().model_dump(mode="json")  # every section written out, so an override changes one key only
    base, checkpointed = build_config(defaults), build_config(defaults, on)
    assert checkpointed.cit.optim.activation_checkpointing and checkpointed.dap.optim.activation_checkpointing
    # Same models, so the same run key may be resumed with it switched on after running out of memory,
    # and the cached base and DAP models are reused.
    assert checkpointed.outputs_digest() == base.outputs_digest() != checkpointed.digest()

    def keys(cfg):
        run = RunContext(config=cfg, run_key="k", parent_run_id="p")
        run._services = SimpleNamespace(store=SimpleNamespace(bucket="b", read_manifest=lambda prefix: {"digest": "m"}))
        ref = lambda name: DatasetRef(name=name, kind="text", digest=f"{name}-digest", uri=f"s3://b/{name}", data_file="d")  # noqa: E731
        return base_model_key(run, ref("general")), dap_key(run, "s3://b/base/model", SimpleNamespace(domain=ref("d"), general=ref("g")))

    assert keys(checkpointed) == keys(base)
    assert keys(build_config(defaults, ["dap.optim.lr=0.5"]))[1] != keys(base)[1]  # a DAP setting that does count


def test_the_benchmark_option_measures_each_model_and_method_off_and_on(tmp_path, monkeypatch):
    """`python -m bench.engine_throughput --activation-checkpointing`, its fresh-process runs stubbed; a run that dies
    (killed for memory) is a row saying so."""
    import json

    from bench import engine_throughput

    jobs = []

    def child(module, job):
        jobs.append(job)
        if job["model"] == "llama-1b" and not job["checkpointing"]:
            raise RuntimeError("bench.engine_throughput failed:\nKilled")
        return {"model": job["model"], "tuning": job["tuning"], "activation_checkpointing": job["checkpointing"], "final_loss": 2.0,
                "training_peak_above_baseline_mib": 50.0 if job["checkpointing"] else 100.0, "tokens_per_s": {"cpu": 90.0, "wall": 80.0}}

    monkeypatch.setattr(engine_throughput, "child", child)
    assert engine_throughput.main(["--activation-checkpointing", "--output", str(tmp_path / "ac.json")]) == 0
    assert [(job["run"], job["model"], job["tuning"], job["checkpointing"]) for job in jobs] == [
        ("checkpointing", model, tuning, on) for model, tunings in (("smollm2", ("full", "attn-proj")), ("llama-1b", ("attn-proj",)))
        for tuning in tunings for on in (False, True)]
    assert all((job["steps"], job["warmup"], job["threads"], job["quick"]) == (4, 1, 1, False) for job in jobs)
    report = json.loads((tmp_path / "ac.json").read_text())
    assert report["command"].endswith("--activation-checkpointing --output " + str(tmp_path / "ac.json"))
    assert [run["activation_checkpointing"] for run in report["runs"]] == [False, True] * 3
    assert report["settings"]["models"]["llama-1b"]["shape"]["num_hidden_layers"] == 22
    text = (tmp_path / "ac.md").read_text()
    assert text == engine_throughput.markdown(report) and text.startswith("### Activation checkpointing")
    assert "| SmolLM2-135M-Instruct | full | on | 50 (-50%) | 90 (+0%) | 80 | 2.0000 |" in text
    assert "| Llama 1.1B (random weights) | attn-proj | off | Killed |" in text and "| attn-proj | on | 50 | 90 | 80 |" in text

    jobs.clear()  # --models, --tunings
    engine_throughput.main(["--activation-checkpointing", "--models", "llama-1b", "--tunings", "full", "--output", str(tmp_path / "b.json")])
    assert [(job["model"], job["tuning"]) for job in jobs] == [("llama-1b", "full")] * 2


def test_the_benchmark_child_trains_the_llama_shape_with_random_token_ids():
    """`--quick`'s run of llama-1b, in this process: the factory's tiny Llama in the 1B's place, attn-proj, checkpointing on."""
    import math

    from bench import engine_throughput

    row = engine_throughput.checkpointing_child("attn-proj", True, steps=3, warmup=1, model="llama-1b", quick=True)
    assert row["model"] == "llama-1b" and row["activation_checkpointing"] and math.isfinite(row["final_loss"])
    assert 0 < row["trainable_params"] < row["params"] and row["tokens_per_s"]["cpu"] > 0
