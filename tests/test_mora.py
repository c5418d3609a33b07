"""MoRA as a peft tuner: parameter budget, zero start, exact merge, save/load, and that it learns."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from models.mora import MoraConfig, MoraLinear, choose_mora_type, mora_rank
from models.mora.layer import mora_update, rotate_chunks
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")


TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # square 32x32 and non-square 32<->64 layers


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    return tiny_model("llama", vocab_size=64, seed=seed, attn_implementation=None, num_key_value_heads=4, max_position_embeddings=2048)


def fixed_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (2, 12), generator=generator)


def train_steps(model: torch.nn.Module, input_ids: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    """Plain AdamW steps on one fixed batch; returns the loss before each step."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return losses


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def mora_model(mora_type: str, r: int = 8, seed: int = 0):
    config = MoraConfig(task_type="CAUSAL_LM", r=r, mora_type=mora_type, target_modules=TARGETS)
    return get_peft_model(tiny_llama(seed), config)


class SingleLinear(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.proj = torch.nn.Linear(in_features, out_features, bias=False)

    def forward(self, x):
        return self.proj(x)


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("in_features,out_features", [(32, 32), (32, 64), (96, 40)])
@pytest.mark.parametrize("r", [4, 8, 64])
def test_trainable_params_match_lora_up_to_the_floor(in_features, out_features, r):
    """r̂ = floor(sqrt((d_in+d_out)·r)) gives r̂² ≤ LoRA's (d_in+d_out)·r < (r̂+1)², i.e. a gap < 2r̂+1."""
    lora_config = LoraConfig(r=r, target_modules=["proj"])
    lora = trainable_count(get_peft_model(SingleLinear(in_features, out_features), lora_config))
    for mora_type in ("sharing", "rotation"):
        config = MoraConfig(r=r, mora_type=mora_type, target_modules=["proj"])
        mora = trainable_count(get_peft_model(SingleLinear(in_features, out_features), config))
        rank = math.isqrt(mora)
        assert rank * rank == mora, "MoRA must train exactly one square matrix"
        assert 0 <= lora - mora < 2 * rank + 1
        assert rank == mora_rank(in_features, out_features, r)


def test_only_the_square_matrices_are_trainable():
    model = mora_model("rotation")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(TARGETS) * 2  # one M per target per layer
    assert all(".mora_M." in name for name in trainable)


@pytest.mark.parametrize("mora_type", ["sharing", "rotation"])
def test_zero_init_leaves_the_model_unchanged(mora_type):
    input_ids = fixed_batch()
    base_logits = logits(tiny_llama(), input_ids)
    assert torch.equal(logits(mora_model(mora_type), input_ids), base_logits)


@pytest.mark.parametrize("mora_type", ["sharing", "rotation"])
def test_merged_model_matches_the_adapter_forward(mora_type):
    input_ids = fixed_batch()
    base_logits = logits(tiny_llama(), input_ids)
    model = mora_model(mora_type)
    train_steps(model, input_ids, steps=3)
    assert all(p.abs().sum() > 0 for name, p in model.named_parameters() if ".mora_M." in name)

    adapted = logits(model, input_ids)
    assert not torch.allclose(adapted, base_logits, atol=1e-3), "training should have moved the model"
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids), base_logits, atol=1e-6, rtol=0)

    merged = model.merge_and_unload()
    assert not any("mora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, input_ids), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mora_type", ["sharing", "rotation"])
@pytest.mark.parametrize(
    "in_features,out_features,r",
    [(32, 32, 64), (48, 20, 3), (20, 48, 3), (64, 64, 4)],  # r̂ > d_in; neither d divisible by r̂; both
)
def test_delta_weight_equals_forward_for_awkward_shapes(mora_type, in_features, out_features, r):
    torch.manual_seed(0)
    layer = MoraLinear(torch.nn.Linear(in_features, out_features), "default", r=r, mora_type=mora_type)
    with torch.no_grad():
        layer.mora_M["default"].normal_()
    x = torch.randn(5, 3, in_features)
    expected = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(x @ layer.get_delta_weight("default").T, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mora_type", ["sharing", "rotation"])
@pytest.mark.parametrize(
    "in_features,out_features,r",
    # SmolLM2's k_proj/v_proj (576 -> 192) and down_proj (1536 -> 576) at the default r, r̂ > d_out
    # (r 64 on k_proj: r̂ 221), a toy d_out < d_in, and the other directions.
    [(576, 192, 8), (1536, 576, 8), (576, 192, 64), (64, 16, 4), (576, 1536, 8), (192, 576, 8), (32, 32, 8)],
)
def test_every_input_feature_and_every_entry_of_m_reaches_the_update(mora_type, in_features, out_features, r):
    """Non-square projections: no column of ΔW is zero (no input feature is ignored), no row is zero
    (no output is left out), and every entry of M changes ΔW (none is trained for nothing).

    Cutting the extra outputs (the reference) dropped whole chunks under rotation when d_out < d_in:
    on 576 -> 192, 342 of the 576 input features never reached the update."""
    torch.manual_seed(0)
    rank = mora_rank(in_features, out_features, r)
    matrix = torch.randn(rank, rank, requires_grad=True)
    delta = mora_update(torch.eye(in_features), matrix, mora_type, out_features).T  # d_out x d_in
    assert int((delta.abs().sum(0) == 0).sum()) == 0, "input features that never reach the update"
    assert int((delta.abs().sum(1) == 0).sum()) == 0, "outputs the update never reaches"
    (delta * torch.randn(out_features, in_features)).sum().backward()
    assert int((matrix.grad == 0).sum()) == 0, "entries of M with no effect on the update"


def test_rotation_gives_a_higher_rank_update_than_sharing():
    """Applying M per chunk (rotation) is not limited to rank r̂ the way a summed (shared) input is."""
    torch.manual_seed(0)
    in_features = out_features = 64
    rank = mora_rank(in_features, out_features, 4)
    matrix = torch.randn(rank, rank)
    ranks = {}
    for mora_type in ("sharing", "rotation"):
        delta = mora_update(torch.eye(in_features), matrix, mora_type, out_features)
        ranks[mora_type] = torch.linalg.matrix_rank(delta).item()
    assert ranks["sharing"] <= rank
    assert ranks["rotation"] > rank


def test_rotation_applies_m_to_each_chunk_under_its_own_rotation():
    """With d a multiple of r̂, ΔW is block-diagonal with blocks M·R_j: R_0 = I, R_j orthogonal and distinct."""
    torch.manual_seed(0)
    features = 64
    rank = mora_rank(features, features, 8)
    assert rank == 32  # two chunks
    matrix = torch.randn(rank, rank)
    delta = mora_update(torch.eye(features), matrix, "rotation", features).T
    first, second = delta[:rank, :rank], delta[rank:, rank:]
    assert torch.count_nonzero(delta[:rank, rank:]) == 0 and torch.count_nonzero(delta[rank:, :rank]) == 0
    torch.testing.assert_close(first, matrix)
    assert not torch.allclose(second, matrix, atol=1e-3)
    torch.testing.assert_close(second @ second.T, matrix @ matrix.T, atol=1e-4, rtol=1e-4)


def test_rotation_of_an_odd_width_keeps_the_unpaired_feature():
    chunks = torch.randn(4, 3, 7)
    rotated = rotate_chunks(chunks)
    torch.testing.assert_close(rotated[..., 6], chunks[..., 6])
    torch.testing.assert_close(rotated.norm(dim=-1), chunks.norm(dim=-1))
    assert not torch.allclose(rotated[:, 1:], chunks[:, 1:])


@pytest.mark.parametrize("mora_type", ["sharing", "rotation"])
def test_save_and_load_round_trip(tmp_path, mora_type):
    input_ids = fixed_batch()
    model = mora_model(mora_type)
    train_steps(model, input_ids, steps=2)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)

    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "MORA" and saved_config["mora_type"] == mora_type

    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert isinstance(reloaded.peft_config["default"], MoraConfig)
    assert torch.equal(logits(reloaded, input_ids), expected)


@pytest.mark.parametrize("mora_type", ["sharing", "rotation"])
def test_training_reduces_loss(mora_type):
    input_ids = fixed_batch()
    model = mora_model(mora_type)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_steps(model, input_ids, steps=8)
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_auto_rule_and_validation():
    assert choose_mora_type(8) == "rotation"
    assert choose_mora_type(31) == "rotation"
    assert choose_mora_type(32) == "sharing"
    assert choose_mora_type(256, "rotation") == "rotation"
    assert MoraConfig(r=8).mora_type == "rotation"
    assert MoraConfig(r=64).mora_type == "sharing"
    with pytest.raises(ValueError, match="mora_type"):
        MoraConfig(r=8, mora_type="diagonal")

