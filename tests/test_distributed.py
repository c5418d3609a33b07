"""Multi-process (DDP and FSDP) training matches single-process training at the same global batch.

The test starts this file twice as a script (rank 0 and 1, torchrun's environment variables,
gloo on the CPU); each rank runs `models.engine.train` under DDP, then under FSDP2, and writes
its losses, final weights and checkpoints to a folder the test then compares with
single-process runs in the test's own process.

Why the examples all have the same length and the same number of masked prompt tokens: each
rank's loss is the mean over *its* supervised tokens, and DDP averages the ranks' gradients, so
the distributed step follows the mean of per-rank means. That equals the single process's
mean over the whole micro-batch only when every rank supervises the same number of tokens
(as also holds across grad_accum micro-batches). With equal counts the two runs compute the
same quantity and differ only by float summation order, hence the small tolerances.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when a rank runs this file as a script
    sys.path.insert(0, str(REPO))

from models.engine import full_state_dict, train  # noqa: E402
from perennial.config import OptimConfig  # noqa: E402
from tests import tiny_models  # noqa: E402
from tests.gloo_ranks import WORLD, gloo_ranks  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

CFG = OptimConfig(lr=3e-3, max_steps=8, batch_size=4, grad_accum=2, warmup_steps=2, weight_decay=0.01, checkpoint_every=4)
FUSED = CFG.model_copy(update={"fused_adamw": True})
SEED = 7
RESUME_STEP = 4


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    return tiny_models.tiny_model("llama", vocab_size=48, seed=seed, attn_implementation=None, num_key_value_heads=4,
                                  max_position_embeddings=64)


def fsdp_input_model(seed: int = 0) -> LlamaForCausalLM:
    """The FSDP runs train all but the embeddings: frozen and trainable parameters then share the
    root FSDP unit, and the checkpoint's parameter indices skip a frozen one. ``seed`` draws the
    trainable weights; the frozen embeddings are always seed 0's, as when a run is resumed on the
    same input model."""
    model = tiny_model(seed)
    model.model.embed_tokens.weight.data.copy_(tiny_model(0).model.embed_tokens.weight)
    model.model.embed_tokens.weight.requires_grad_(False)
    return model


def equal_length_examples(count: int = 24, length: int = 12, masked: int = 3) -> list[dict]:
    """Same length and same masked prefix everywhere: every rank supervises the same token count."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):
        ids = torch.randint(3, 48, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * masked + ids[masked:]})
    return rows


def _worker(out_dir: Path) -> None:
    """One rank: a straight DDP run with a mid-run checkpoint, then a resumed DDP run from it."""
    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'rendezvous'}",
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    rank = dist.get_rank()
    data = equal_length_examples()
    checkpoints = out_dir / "checkpoints"
    straight_model = tiny_model(seed=0)
    straight = train(straight_model, data, CFG, seed=SEED, pad_token_id=0,
                     checkpoint_dir=checkpoints, checkpoint_fn=lambda step, path: None)
    dist.barrier()  # rank 0 wrote the checkpoint; every rank reads it below

    # A differently initialised model: the checkpoint must restore weights, optimizer, schedule, RNG.
    resumed_model = tiny_model(seed=99)
    resumed = train(resumed_model, data, CFG, seed=SEED, pad_token_id=0,
                    resume_from=checkpoints / f"step-{RESUME_STEP:08d}")

    try:  # 3 examples cannot be split evenly over 2 ranks
        train(tiny_model(), data, CFG.model_copy(update={"batch_size": 3}), seed=SEED, pad_token_id=0)
        indivisible_error = ""
    except ValueError as error:
        indivisible_error = str(error)

    save_file({n: p.detach().contiguous() for n, p in straight_model.named_parameters()}, out_dir / f"straight-{rank}.safetensors")
    save_file({n: p.detach().contiguous() for n, p in resumed_model.named_parameters()}, out_dir / f"resumed-{rank}.safetensors")

    # FSDP: the same straight run and a resume from its own mid-run checkpoint.
    fsdp_checkpoints = out_dir / "fsdp-checkpoints"
    fsdp_model = fsdp_input_model(seed=0)
    fsdp = train(fsdp_model, data, CFG, seed=SEED, pad_token_id=0, strategy="fsdp",
                 checkpoint_dir=fsdp_checkpoints, checkpoint_fn=lambda step, path: None)
    fsdp_weights = full_state_dict(fsdp_model)  # gathered to rank 0; every rank must call it
    dist.barrier()
    fsdp_resumed_model = fsdp_input_model(seed=99)
    fsdp_resumed = train(fsdp_resumed_model, data, CFG, seed=SEED, pad_token_id=0, strategy="fsdp",
                         resume_from=fsdp_checkpoints / f"step-{RESUME_STEP:08d}")
    fsdp_resumed_weights = full_state_dict(fsdp_resumed_model)
    # Activation checkpointing changes no bit under either strategy (tests/test_activation_checkpointing.py in one process).
    checkpointing = CFG.model_copy(update={"activation_checkpointing": True})
    ddp_checkpointed_model = tiny_model(seed=0)
    ddp_checkpointed = train(ddp_checkpointed_model, data, checkpointing, seed=SEED, pad_token_id=0)
    fsdp_checkpointed_model = fsdp_input_model(seed=0)
    fsdp_checkpointed = train(fsdp_checkpointed_model, data, checkpointing, seed=SEED, pad_token_id=0, strategy="fsdp")
    fsdp_checkpointed_weights = full_state_dict(fsdp_checkpointed_model)
    # optim.fused_adamw steps the DTensor shards with the fused kernel; its checkpoint records the kernel.
    fsdp_fused_model = fsdp_input_model(seed=0)
    fsdp_fused = train(fsdp_fused_model, data, FUSED, seed=SEED, pad_token_id=0, strategy="fsdp",
                       checkpoint_dir=out_dir / "fsdp-fused-checkpoints", checkpoint_fn=lambda step, path: None)
    fsdp_fused_weights = full_state_dict(fsdp_fused_model)
    save_file({n: p.detach().contiguous() for n, p in ddp_checkpointed_model.named_parameters()},
              out_dir / f"ddp-checkpointed-{rank}.safetensors")
    if rank == 0:
        save_file(fsdp_weights, out_dir / "fsdp-straight.safetensors")
        save_file(fsdp_resumed_weights, out_dir / "fsdp-resumed.safetensors")
        save_file(fsdp_checkpointed_weights, out_dir / "fsdp-checkpointed.safetensors")
        save_file(fsdp_fused_weights, out_dir / "fsdp-fused.safetensors")
    else:
        assert not fsdp_weights, "only rank 0 receives the gathered state"

    (out_dir / f"result-{rank}.json").write_text(json.dumps({
        "losses": straight.losses, "resumed_losses": resumed.losses, "resumed_from": resumed.resumed_from,
        "tokens": straight.tokens, "indivisible_error": indivisible_error,
        "fsdp_losses": fsdp.losses, "fsdp_resumed_losses": fsdp_resumed.losses, "fsdp_resumed_from": fsdp_resumed.resumed_from,
        "ddp_checkpointed_losses": ddp_checkpointed.losses, "fsdp_checkpointed_losses": fsdp_checkpointed.losses,
        "fsdp_fused_losses": fsdp_fused.losses,
    }))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the two ranks, train the single-process reference meanwhile, then collect both."""
    out_dir = tmp_path_factory.mktemp("ddp")
    with gloo_ranks(__file__, out_dir) as ranks:
        single = single_process_run(out_dir / "single-checkpoints")
        ranks.wait(timeout=180)
    return out_dir, single


def single_process_run(checkpoints: Path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from threads, and loses much on a busy machine
    try:
        model = tiny_model(seed=0)
        result = train(model, equal_length_examples(), CFG, seed=SEED, pad_token_id=0)
        # The FSDP runs' reference, with a checkpoint to compare theirs with, file by file.
        frozen_model = fsdp_input_model(seed=0)
        frozen = train(frozen_model, equal_length_examples(), CFG, seed=SEED, pad_token_id=0,
                       checkpoint_dir=checkpoints, checkpoint_fn=lambda step, path: None)
        fused_model = fsdp_input_model(seed=0)
        fused = train(fused_model, equal_length_examples(), FUSED, seed=SEED, pad_token_id=0)
    finally:
        torch.set_num_threads(threads)
    return {
        "result": result, "weights": {n: p.detach() for n, p in model.named_parameters()},
        "frozen": frozen, "frozen_weights": {n: p.detach() for n, p in frozen_model.named_parameters()},
        "fused": fused, "fused_weights": {n: p.detach() for n, p in fused_model.named_parameters()},
        "checkpoint": checkpoints / f"step-{RESUME_STEP:08d}",
    }


@pytest.fixture(scope="module")
def ddp_run(runs) -> Path:
    return runs[0]


@pytest.fixture(scope="module")
def single_run(runs):
    return runs[1]


def test_two_ranks_follow_the_single_process_loss_and_weights(ddp_run, single_run):
    single, single_weights = single_run["result"], single_run["weights"]
    rank0 = json.loads((ddp_run / "result-0.json").read_text())
    # Losses are averaged over ranks, so rank 0 reports the global loss, not its half-batch's.
    assert rank0["losses"] == pytest.approx(single.losses, rel=1e-4)
    assert len(rank0["losses"]) == CFG.max_steps
    # Tokens are summed over ranks: the global micro-batch, every step.
    assert rank0["tokens"] == single.tokens == CFG.max_steps * CFG.grad_accum * CFG.batch_size * 12
    ddp_weights = load_file(ddp_run / "straight-0.safetensors")
    assert ddp_weights.keys() == single_weights.keys()
    for name, expected in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], expected, rtol=1e-4, atol=2e-5, msg=name)


def test_ranks_stay_identical(ddp_run):
    rank0, rank1 = (json.loads((ddp_run / f"result-{r}.json").read_text()) for r in range(WORLD))
    assert rank0["losses"] == rank1["losses"]  # so the checkpoint's loss history does not depend on the rank
    weights0, weights1 = (load_file(ddp_run / f"straight-{r}.safetensors") for r in range(WORLD))
    for name in weights0:
        assert torch.equal(weights0[name], weights1[name]), name


def test_resumed_ddp_run_matches_the_straight_one_exactly(ddp_run):
    rank0 = json.loads((ddp_run / "result-0.json").read_text())
    assert rank0["resumed_from"] == RESUME_STEP
    assert rank0["resumed_losses"] == rank0["losses"]
    straight, resumed = load_file(ddp_run / "straight-0.safetensors"), load_file(ddp_run / "resumed-0.safetensors")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_batch_not_divisible_by_ranks_is_refused(ddp_run):
    rank0 = json.loads((ddp_run / "result-0.json").read_text())
    assert "must be divisible by the number of processes 2" in rank0["indivisible_error"]


def test_fsdp_ranks_follow_the_single_process_loss_and_weights(ddp_run, single_run):
    single, single_weights = single_run["frozen"], single_run["frozen_weights"]
    rank0, rank1 = (json.loads((ddp_run / f"result-{r}.json").read_text()) for r in range(WORLD))
    assert rank0["fsdp_losses"] == pytest.approx(single.losses, rel=1e-4)
    assert rank0["fsdp_losses"] == rank1["fsdp_losses"]
    gathered = load_file(ddp_run / "fsdp-straight.safetensors")
    # Whole tensors under the plain parameter names, not shards or FSDP-prefixed names.
    assert gathered.keys() == single_weights.keys()
    for name, expected in single_weights.items():
        assert gathered[name].shape == expected.shape, name
        torch.testing.assert_close(gathered[name], expected, rtol=1e-4, atol=2e-5, msg=name)
    assert torch.equal(gathered["model.embed_tokens.weight"], tiny_model(0).model.embed_tokens.weight.detach())


def test_fsdp_checkpoint_has_the_single_process_format(ddp_run, single_run):
    fsdp_dir, single_dir = ddp_run / "fsdp-checkpoints" / f"step-{RESUME_STEP:08d}", single_run["checkpoint"]
    assert sorted(p.name for p in fsdp_dir.iterdir()) == sorted(p.name for p in single_dir.iterdir())
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        fsdp, single = load_file(fsdp_dir / name), load_file(single_dir / name)
        assert fsdp.keys() == single.keys(), name  # optimizer: "<param index>.<state>", as one process writes it
        for key in single:
            assert fsdp[key].shape == single[key].shape and fsdp[key].dtype == single[key].dtype, key
            # Scaled to each tensor (Adam's second moments are ~1e-8): float summation order differs,
            # a wrong parameter index would not be close at all.
            scale = float(single[key].abs().max())
            torch.testing.assert_close(fsdp[key], single[key], rtol=1e-3, atol=1e-3 * scale, msg=key)
    assert "model.embed_tokens.weight" not in load_file(fsdp_dir / "trainable.safetensors")  # frozen: not saved
    fsdp_meta, single_meta = (json.loads((d / "state.json").read_text()) for d in (fsdp_dir, single_dir))
    assert fsdp_meta["step"] == single_meta["step"] == RESUME_STEP
    assert fsdp_meta["param_groups"] == single_meta["param_groups"]
    assert fsdp_meta["scheduler"] == single_meta["scheduler"]
    assert fsdp_meta["losses"] == pytest.approx(single_meta["losses"], rel=1e-4)


def test_fsdp_checkpoint_resumes_in_one_process(ddp_run, single_run, single_torch_thread):
    model = fsdp_input_model(seed=99)
    resumed = train(model, equal_length_examples(), CFG, seed=SEED, pad_token_id=0,
                    resume_from=ddp_run / "fsdp-checkpoints" / f"step-{RESUME_STEP:08d}")
    assert resumed.resumed_from == RESUME_STEP
    assert resumed.losses == pytest.approx(single_run["frozen"].losses, rel=1e-4)
    for name, expected in single_run["frozen_weights"].items():
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), expected, rtol=1e-4, atol=2e-5, msg=name)


def test_resumed_fsdp_run_matches_the_straight_one_exactly(ddp_run):
    rank0 = json.loads((ddp_run / "result-0.json").read_text())
    assert rank0["fsdp_resumed_from"] == RESUME_STEP
    assert rank0["fsdp_resumed_losses"] == rank0["fsdp_losses"]
    straight, resumed = load_file(ddp_run / "fsdp-straight.safetensors"), load_file(ddp_run / "fsdp-resumed.safetensors")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_activation_checkpointing_changes_no_bit_under_ddp_or_fsdp(ddp_run):
    rank0 = json.loads((ddp_run / "result-0.json").read_text())
    assert rank0["ddp_checkpointed_losses"] == rank0["losses"]
    assert rank0["fsdp_checkpointed_losses"] == rank0["fsdp_losses"]
    pairs = [("straight-0", "ddp-checkpointed-0"), ("fsdp-straight", "fsdp-checkpointed")]
    for plain, checkpointed in pairs:
        plain_weights, checkpointed_weights = (load_file(ddp_run / f"{name}.safetensors") for name in (plain, checkpointed))
        assert plain_weights.keys() == checkpointed_weights.keys()
        for name in plain_weights:
            assert torch.equal(plain_weights[name], checkpointed_weights[name]), (checkpointed, name)


def test_fused_adamw_under_fsdp_follows_one_process(ddp_run, single_run):
    """optim.fused_adamw steps FSDP2's DTensor shards with the fused kernel and follows one process's fused run;
    the checkpoint records the fused kernel, so a resume without it is refused."""
    rank0 = json.loads((ddp_run / "result-0.json").read_text())
    assert rank0["fsdp_fused_losses"] == pytest.approx(single_run["fused"].losses, rel=1e-4)
    gathered = load_file(ddp_run / "fsdp-fused.safetensors")
    for name, expected in single_run["fused_weights"].items():
        torch.testing.assert_close(gathered[name], expected, rtol=1e-4, atol=2e-5, msg=name)
    meta = json.loads((ddp_run / "fsdp-fused-checkpoints" / f"step-{RESUME_STEP:08d}" / "state.json").read_text())
    assert all(group["fused"] for group in meta["param_groups"])
    with pytest.raises(ValueError, match="was written with optim.fused_adamw=true"):
        train(fsdp_input_model(seed=99), equal_length_examples(), CFG, seed=SEED, pad_token_id=0,
              resume_from=ddp_run / "fsdp-fused-checkpoints" / f"step-{RESUME_STEP:08d}")


if __name__ == "__main__":  # a rank started by the `runs` fixture
    _worker(Path(sys.argv[1]))
