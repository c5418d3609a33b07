import copy
import math
import re
import shutil

import pytest
import torch

from models.engine import NonFiniteLossError, lr_multiplier, save_state, stream_indices, train
from perennial.config import OptimConfig
from tests import tiny_models


def tiny_model(seed=0):
    return tiny_models.tiny_model("llama", vocab_size=48, seed=seed, attn_implementation=None, num_key_value_heads=4,
                                  max_position_embeddings=64)


def examples(count=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(6, 16, (1,), generator=generator))
        ids = torch.randint(3, 48, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return rows


def test_stream_indices_cover_each_epoch_once_and_depend_only_on_position():
    first_epoch = stream_indices(10, seed=3, start=0, count=10)
    assert sorted(first_epoch) == list(range(10))
    assert stream_indices(10, 3, 7, 6) == stream_indices(10, 3, 0, 13)[7:]
    assert stream_indices(10, 3, 10, 10) != first_epoch  # a new permutation each epoch


def test_unshuffled_stream_keeps_the_callers_order():
    assert stream_indices(5, seed=3, start=3, count=6, shuffle=False) == [3, 4, 0, 1, 2, 3]


def test_schedules_warm_up_then_decay():
    cfg = OptimConfig(lr=1e-3, warmup_steps=4, max_steps=20, schedule="cosine")
    values = [lr_multiplier(step, cfg) for step in range(20)]
    assert values[0] < values[3] < values[4] == pytest.approx(1.0)
    assert values[-1] < values[10] < values[4]
    linear = OptimConfig(lr=1e-3, warmup_steps=0, max_steps=10, schedule="linear")
    assert lr_multiplier(9, linear) == pytest.approx(1.0 - 0.9 * 0.9)


def test_training_reduces_loss_with_accumulation():
    model = tiny_model()
    data = examples()
    cfg = OptimConfig(lr=5e-3, max_steps=30, batch_size=4, grad_accum=2, warmup_steps=2, log_every=5)
    logged = []
    result = train(model, data, cfg, seed=0, pad_token_id=0, log_fn=lambda m, s: logged.append(s))
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5
    assert logged == [5, 10, 15, 20, 25, 30]


def test_interrupted_and_resumed_run_matches_straight_run_bit_for_bit(tmp_path):
    data = examples()
    cfg = OptimConfig(lr=3e-3, max_steps=12, batch_size=4, grad_accum=2, warmup_steps=3, checkpoint_every=5, weight_decay=0.01)
    init = tiny_model()

    straight_model = copy.deepcopy(init)
    saved = []
    straight = train(straight_model, data, cfg, seed=1, pad_token_id=0, checkpoint_dir=tmp_path,
                     checkpoint_fn=lambda step, path: saved.append(path))
    assert [p.name for p in saved] == ["step-00000005", "step-00000010"]

    resumed_model = copy.deepcopy(init)
    torch.manual_seed(12345)  # a restarted process has unrelated RNG state; the checkpoint restores it
    resumed = train(resumed_model, data, cfg, seed=1, pad_token_id=0, resume_from=saved[0])
    assert resumed.resumed_from == 5
    assert resumed.losses == straight.losses  # exact float equality: no repeated or skipped steps
    for (name, a), (_, b) in zip(straight_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), name


def test_checkpoint_holds_no_pickle(tmp_path):
    model = tiny_model()
    cfg = OptimConfig(lr=1e-3, max_steps=2, batch_size=2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    train(model, examples(8), cfg, seed=0, pad_token_id=0)
    save_state(tmp_path, model, optimizer, scheduler, 2, [1.0])
    suffixes = {p.suffix for p in tmp_path.iterdir()}
    assert suffixes <= {".safetensors", ".json"}


def test_empty_examples_fail_loudly():
    with pytest.raises(ValueError, match="no training examples"):
        train(tiny_model(), [], OptimConfig(max_steps=1), seed=0, pad_token_id=0)


FAULT_STEP = 3


def nan_loss_at(step: int, model):
    """The final norm's output turns nan in the forward pass of `step` (counted from 1): nan loss and gradients."""
    forwards = iter(range(1, 1_000))
    return model.model.norm.register_forward_hook(
        lambda module, inputs, output: output * float("nan") if next(forwards) == step else output)


def inf_gradient_at(step: int, model):
    """One weight's gradient is inf in the backward pass of `step`: a finite loss, an inf gradient norm."""
    backwards = iter(range(1, 1_000))
    return model.model.layers[1].mlp.down_proj.weight.register_hook(
        lambda grad: torch.full_like(grad, float("inf")) if next(backwards) == step else grad)


@pytest.mark.parametrize(
    "fault,loss_text,norm_text", [(nan_loss_at, "nan", "nan"), (inf_gradient_at, r"[0-9.]+", "inf")],
    ids=["nan-loss", "inf-gradient-norm"],
)
def test_non_finite_step_stops_training_before_it_changes_or_saves_anything(fault, loss_text, norm_text, tmp_path):
    data = examples()
    cfg = OptimConfig(lr=3e-3, max_steps=6, batch_size=4, warmup_steps=0, checkpoint_every=1)
    model = tiny_model()
    fault_handle = fault(FAULT_STEP, model)
    weights_after = {}
    committed = []
    with pytest.raises(NonFiniteLossError) as raised:
        train(model, data, cfg, seed=0, pad_token_id=0, desc="cit-1", checkpoint_dir=tmp_path,
              checkpoint_fn=lambda step, path: committed.append(step),
              on_step_end=lambda step, m: weights_after.__setitem__(step, copy.deepcopy(m.state_dict())))
    message = str(raised.value)
    match = re.match(rf"cit-1: non-finite training loss ({loss_text}) \(gradient norm {norm_text}\) at step {FAULT_STEP} of 6;", message)
    assert match, message
    assert (norm_text == "nan") or math.isfinite(float(match.group(1)))  # the inf-gradient step's loss itself was fine
    # Stopped before the update: every weight is what step FAULT_STEP - 1 left, bit for bit.
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights_after[FAULT_STEP - 1][name]), name
    # Nothing at or after the faulty step was saved or handed to the committer.
    assert committed == list(range(1, FAULT_STEP))
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"step-{step:08d}" for step in range(1, FAULT_STEP)]

    # The last checkpoint still resumes (as a rerun after fixing the cause does) and matches a run that never failed.
    fault_handle.remove()
    straight = train(tiny_model(), data, cfg.model_copy(update={"checkpoint_every": 0}), seed=0, pad_token_id=0)
    resumed_model = tiny_model(seed=1)
    resumed = train(resumed_model, data, cfg, seed=0, pad_token_id=0, resume_from=tmp_path / f"step-{FAULT_STEP - 1:08d}")
    assert resumed.resumed_from == FAULT_STEP - 1 and resumed.losses == straight.losses


def test_inf_weight_in_the_input_model_fails_at_step_1_with_nothing_trained():
    """The reported case: one inf weight used to give losses [nan, nan, nan] and a model of nans, returned normally."""
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NonFiniteLossError, match=r"^dap: non-finite training loss nan .* at step 1 of 3;"):
        train(model, examples(), OptimConfig(lr=1e-3, max_steps=3, batch_size=4, warmup_steps=0), seed=0,
              pad_token_id=0, desc="dap")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_the_loop_reads_on_one_screen_as_setup_step_checkpoint():
    """engine.train is the loop alone (as nanoGPT's train.py): setup, one step, a checkpoint, each a named function."""
    import inspect

    from models import engine

    source = inspect.getsource(engine.train)
    body = source.split('"""', 2)[2]  # after the docstring
    assert len(body.strip().splitlines()) <= 30
    for step in ("setup(", "train_step(run, step)", "checkpoint(run, done"):
        assert step in body
    assert len(inspect.getsource(engine.train_step).splitlines()) <= 40


def test_fused_adamw_is_opt_in_trains_close_to_the_loop_and_resumes_only_under_its_own_setting(tmp_path, monkeypatch):
    """`optim.fused_adamw`: torch.optim.AdamW(fused=True), whose updates differ from the per-tensor loop's in the last
    bits; so the losses are close, and a checkpoint of one kind does not resume under the other."""
    from models import engine

    data = examples()
    cfg = OptimConfig(lr=3e-3, max_steps=8, batch_size=4, grad_accum=2, warmup_steps=2, checkpoint_every=4, weight_decay=0.01)
    fused_cfg = cfg.model_copy(update={"fused_adamw": True})
    built = []
    build = engine.build_optimizer
    monkeypatch.setattr(engine, "build_optimizer", lambda model, c: built.append(build(model, c)) or built[-1])
    plain = train(tiny_model(), data, cfg, seed=1, pad_token_id=0)
    saved = []
    fused_model = tiny_model()
    fused = train(fused_model, data, fused_cfg, seed=1, pad_token_id=0, checkpoint_dir=tmp_path,
                  checkpoint_fn=lambda step, path: saved.append(path))
    assert OptimConfig().fused_adamw is False
    assert [optimizer.defaults["fused"] for optimizer in built] == [None, True]  # the engine's optimizers, as built
    assert all(math.isfinite(loss) for loss in fused.losses) and fused.losses[-1] < fused.losses[0]
    assert fused.losses == pytest.approx(plain.losses, rel=1e-4)  # close; equal only by chance (last-bit differences)

    # Its own checkpoint resumes bit for bit; the unfused optimizer refuses it (its saved groups would switch the kernel).
    resumed_model = tiny_model()
    assert train(resumed_model, data, fused_cfg, seed=1, pad_token_id=0, resume_from=saved[0]).losses == fused.losses
    for (name, a), (_, b) in zip(fused_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="written with optim.fused_adamw=true, this run has false"):
        train(tiny_model(), data, cfg, seed=1, pad_token_id=0, resume_from=saved[0])


def test_compile_is_opt_in_trains_what_eager_trains_and_leaves_the_model_eager(monkeypatch):
    """`optim.compile`: the loop's forward and backward run as TorchInductor graphs and follow the eager run to
    1e-4; the model the caller holds stays eager, so evaluating it afterwards compiles nothing; without a C++
    compiler the run is refused before any step."""
    from torch._dynamo.utils import counters

    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": [-100] * 3 + ids[3:]}  # one length: one graph
            for ids in (torch.randint(3, 48, (12,), generator=generator).tolist() for _ in range(32))]
    cfg = OptimConfig(lr=3e-3, max_steps=6, batch_size=4, warmup_steps=1, weight_decay=0.01)
    assert OptimConfig().compile is False and "compile" not in OptimConfig().model_dump()  # no key made before it changes
    compiled_cfg = cfg.model_copy(update={"compile": True})
    assert compiled_cfg.model_dump()["compile"] is True

    eager = train(tiny_model(), data, cfg, seed=1, pad_token_id=0)
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    model = tiny_model()
    compiled = train(model, data, compiled_cfg, seed=1, pad_token_id=0)
    assert counters["stats"]["unique_graphs"] > graphs  # it did run compiled graphs
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4) and compiled.losses[-1] < compiled.losses[0]
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))  # a new shape: an eager model compiles nothing
    assert counters["stats"]["unique_graphs"] == graphs and not isinstance(model, torch._dynamo.eval_frame.OptimizedModule)

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="optim.compile: TorchInductor needs a C.. compiler"):
        train(tiny_model(), data, compiled_cfg, seed=1, pad_token_id=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("grad_clip, clipped_steps", [(1e-3, 2), (1e6, 0)])
def test_clipping_matches_clip_grad_norm_bit_for_bit_and_skips_the_scaling_it_would_not_change(grad_clip, clipped_steps, monkeypatch):
    """The engine reads the gradient norm first and scales the gradients only where clip_grad_norm_'s factor is below 1:
    its weights equal a loop calling clip_grad_norm_ every step, bit for bit, clipped or not."""
    from models import engine
    from models.data import collate

    data = examples(8)
    cfg = OptimConfig(lr=3e-3, max_steps=2, batch_size=4, warmup_steps=0, schedule="constant", grad_clip=grad_clip)
    reference = tiny_model()
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    reference.train()
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        reference(**collate(data[4 * step : 4 * step + 4], 0), use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), grad_clip)
        optimizer.step()

    scalings = []
    scale = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(engine.torch.nn.utils, "clip_grads_with_norm_", lambda *args: scalings.append(1) or scale(*args))
    trained = tiny_model()
    train(trained, data, cfg, seed=0, pad_token_id=0, shuffle=False)
    assert len(scalings) == clipped_steps
    for (name, a), (_, b) in zip(trained.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name
    unclipped = tiny_model()
    train(unclipped, data, cfg.model_copy(update={"grad_clip": 1e6}), seed=0, pad_token_id=0, shuffle=False)
    # the control: clipping at 1e-3 changes the weights
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), unclipped.parameters())) == (clipped_steps > 0)
