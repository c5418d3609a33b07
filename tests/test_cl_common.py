"""Shared pieces for the continual-learning tests, and the state round-trip test for every plugin.

The synthetic task sequence: task k maps a prompt [marker_k, x1..x4, SEP] to the response
[x1+s_k, .., x4+s_k] (mod 32 over tokens 10..41). The tasks share inputs but disagree on the
answer, so plain sequential fine-tuning on task 2 overwrites task 1 almost completely: a clear
baseline for every method to beat, learnt in seconds by a 2-layer model.
"""

from __future__ import annotations

import copy
import functools
import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from models.cl.base import PluginState, TaskContext
from models.data import IGNORE_INDEX, collate
from models.engine import train
from perennial.config import OptimConfig
from tests import tiny_models

VOCAB = 64
PAD = 0
SEP = 6
SHIFTS = (1, 7, 13)
TASK1_STEPS = 60
TASK2_STEPS = 40


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    return tiny_models.tiny_model("llama", vocab_size=VOCAB, seed=seed, num_key_value_heads=4, max_position_embeddings=32,
                                  pad_token_id=PAD)


def task_examples(task: int, count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed * 31 + task)
    rows = []
    for _ in range(count):
        xs = [rng.randrange(10, 42) for _ in range(4)]
        ys = [10 + (x - 10 + SHIFTS[task]) % 32 for x in xs]
        prompt = [3 + task] + xs + [SEP]
        rows.append({"input_ids": prompt + ys, "labels": [IGNORE_INDEX] * len(prompt) + ys})
    return rows


TRAIN = [task_examples(task, 160, seed=0) for task in range(3)]
HELD_OUT = [task_examples(task, 48, seed=99) for task in range(3)]


def optim(steps: int, lr: float = 1e-2, **overrides) -> OptimConfig:
    return OptimConfig(lr=lr, max_steps=steps, batch_size=16, warmup_steps=0, schedule="constant", log_every=1000,
                       **overrides)


def task_loss(model, examples: list[dict]) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = float(model(**collate(examples, PAD)).loss)
    model.train(was_training)
    return loss


def context(model, task: int, examples: list[dict] | None = None) -> TaskContext:
    return TaskContext(task_index=task, task_name=f"task-{task}", model=model,
                       train_examples=TRAIN[task] if examples is None else examples, pad_token_id=PAD)


def run_task(model, task: int, plugins=(), steps: int | None = None, lr: float = 1e-2, after: bool = True):
    """What the stage runner does for one task: before_task -> train -> after_task (unless after=False)."""
    ctx = context(model, task)
    for plugin in plugins:
        plugin.before_task(ctx)
    result = train(model, ctx.train_examples, optim(steps or (TASK1_STEPS if task == 0 else TASK2_STEPS), lr=lr),
                   seed=task, pad_token_id=PAD, plugins=plugins)
    if after:
        for plugin in plugins:
            plugin.after_task(ctx)
    return result


@functools.lru_cache(maxsize=None)
def _after_task1_state() -> dict:
    model = tiny_model()
    run_task(model, 0)
    return copy.deepcopy(model.state_dict())


def model_after_task1() -> LlamaForCausalLM:
    """A fresh copy of the model trained on task 1 (trained once per test session)."""
    model = tiny_model()
    model.load_state_dict(_after_task1_state())
    return model


@functools.lru_cache(maxsize=None)
def _plain_after_task2_state() -> dict:
    model = model_after_task1()
    run_task(model, 1)
    return copy.deepcopy(model.state_dict())


def plain_after_task2() -> LlamaForCausalLM:
    """Task 1 then task 2 by plain sequential fine-tuning: the baseline every method is compared to."""
    model = tiny_model()
    model.load_state_dict(_plain_after_task2_state())
    return model


def through_files(state: PluginState, directory) -> PluginState:
    """A plugin state written and read back the way checkpoints store it: safetensors + JSON."""
    save_file(state.tensors or {"_empty": torch.zeros(0)}, directory / "plugin.safetensors")
    (directory / "plugin.json").write_text(json.dumps(state.meta))
    tensors = {k: v for k, v in load_file(directory / "plugin.safetensors").items() if k != "_empty"}
    return PluginState(tensors, json.loads((directory / "plugin.json").read_text()))


def assert_states_equal(a: PluginState, b: PluginState) -> None:
    assert a.meta == b.meta
    assert sorted(a.tensors) == sorted(b.tensors)
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key


# --- the generic round trip ------------------------------------------------------------------------


def _plugin_cases():
    from models.cl.registry import build_plugins

    configs = {
        "ewc": {"name": "ewc", "strength": 10.0, "fisher_samples": 8},
        "lwf": {"name": "lwf"},
        "averaging": {"name": "averaging", "alpha": 0.3, "per_layer": {r"layers\.0\.": 0.7}},
        "seekr": {"name": "seekr", "samples_per_task": 6, "replay_batch_size": 3},
        "olora": {"name": "olora", "lambda_orth": 0.1, "lambda_l2": 0.01},
    }
    return {name: (lambda config=config: build_plugins([config], seed=5)[0]) for name, config in configs.items()}


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_model(model=None, targets=("q_proj", "v_proj")):
    """A peft LoRA model (r=4) over `model` (default: a fresh tiny model)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model or tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))


@pytest.mark.parametrize("method", ["ewc", "lwf", "averaging", "seekr", "olora"])
def test_plugin_state_round_trips_and_training_resumes_exactly(method, tmp_path):
    """State after a task survives safetensors + JSON, and a task interrupted mid-way and resumed
    the way the stage runner does it (fresh plugin, load state, before_task, train(resume_from))
    reproduces the straight run's losses and weights exactly."""
    make = _plugin_cases()[method]
    base = lora_model() if method == "olora" else tiny_model()
    plugin = make()
    run_task(base, 0, [plugin], steps=4)
    saved = plugin.state_dict()
    restored = make()
    restored.load_state_dict(through_files(saved, tmp_path))
    assert_states_equal(restored.state_dict(), saved)

    checkpoints = []
    straight_model = copy.deepcopy(base)
    straight_plugin = make()
    straight_plugin.load_state_dict(saved)
    ctx = context(straight_model, 1)
    straight_plugin.before_task(ctx)
    cfg = optim(6, checkpoint_every=3)
    straight = train(straight_model, ctx.train_examples, cfg, seed=1, pad_token_id=PAD, plugins=[straight_plugin],
                     checkpoint_dir=tmp_path / "ckpt", checkpoint_fn=lambda step, path: checkpoints.append(path))
    straight_plugin.after_task(ctx)

    resumed_model = copy.deepcopy(base)
    resumed_plugin = make()
    resumed_plugin.load_state_dict(through_files(saved, tmp_path))
    ctx = context(resumed_model, 1)
    resumed_plugin.before_task(ctx)
    resumed = train(resumed_model, ctx.train_examples, cfg, seed=1, pad_token_id=PAD, plugins=[resumed_plugin],
                    resume_from=checkpoints[0])
    resumed_plugin.after_task(ctx)

    assert resumed.resumed_from == 3
    assert resumed.losses == straight.losses
    for (name, a), (_, b) in zip(straight_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), name
    assert_states_equal(resumed_plugin.state_dict(), straight_plugin.state_dict())
