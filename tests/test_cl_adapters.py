"""CL plugins under adapters refer to functions of the model, not to parameter names (issue #38, point 2).

Every CIT task starts a fresh adapter on the previous task's merged weights, so two tasks' adapter
parameters share names and shapes but not meaning. EWC and averaging must work on the weights the
exported model holds; O-LoRA's subspaces must belong to the same layers; SEEKR's teacher outputs
must be those of the model the next task starts from.
"""

from __future__ import annotations

import copy

import pytest
import torch

from models.cl.base import TaskContext, trained_weights
from models.cl.ewc import diagonal_fisher
from models.cl.registry import build_plugins
from models.data import collate, encode_instruction
from models.engine import train
from models.tuning import apply_tuning, merge_for_export
from perennial.config import OptimConfig, TuningConfig
from tests.tiny_models import tiny

pytestmark = pytest.mark.usefixtures("single_torch_thread")

OPTIM = OptimConfig(lr=1e-2, max_steps=3, batch_size=2, warmup_steps=0, max_length=32, schedule="constant")
LORA = TuningConfig(method="lora", r=4)
TASKS = [
    [("What is 2+2?", "Four."), ("And times 3?", "Twelve."), ("What is 1+1?", "Two."), ("And 5?", "Five.")],
    [("Say hello.", "Hello!"), ("Be brief.", "Fine."), ("Answer in French.", "Oui."), ("How are you?", "Fine, thank you.")],
]


def encoded(tokenizer, task: int) -> list[dict]:
    return [encode_instruction(tokenizer, prompt, response, OPTIM.max_length) for prompt, response in TASKS[task]]


def run_task(model, tokenizer, plugins, task: int, tuning: TuningConfig = LORA):
    """One CIT task as tasks/stage.py runs it: a fresh adapter (seeded per task), before_task, train, after_task.
    Returns the tuned model and its context."""
    torch.manual_seed(100 + task)
    tuned = apply_tuning(model, tuning)
    context = TaskContext(task, f"task-{task}", tuned, encoded(tokenizer, task), tokenizer.pad_token_id)
    for plugin in plugins:
        plugin.before_task(context)
    train(tuned, context.train_examples, OPTIM, seed=task, pad_token_id=tokenizer.pad_token_id, plugins=plugins)
    for plugin in plugins:
        plugin.after_task(context)
    return tuned, context


def next_task_plugins(plugins, methods):
    """The plugins of the next task: built afresh and loaded with the previous task's state, as the stage runner does."""
    following = build_plugins(methods, seed=0)
    for old, new in zip(plugins, following):
        new.load_state_dict(old.state_dict())
    return following


EWC = [{"name": "ewc", "strength": 100.0, "fisher_samples": 4}]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "mistral", "phi3", "gpt_neox", "gpt2", "falcon"])
def test_ewc_under_lora_does_not_pull_the_next_tasks_fresh_adapter_towards_the_last_one(family):
    model, tokenizer = tiny(family)
    plugins = build_plugins(EWC, seed=0)
    tuned, _ = run_task(model, tokenizer, plugins, 0)
    start = merge_for_export(tuned)  # the model task 2 starts from: task 1's adapter merged in
    (ewc,) = next_task_plugins(plugins, EWC)

    torch.manual_seed(101)
    fresh = apply_tuning(copy.deepcopy(start), LORA)  # same names and shapes as task 1's adapter, new values
    batch = collate(encoded(tokenizer, 1)[:2], tokenizer.pad_token_id)
    penalty = ewc.extra_loss(fresh, batch, None)
    assert penalty is not None and abs(penalty.item()) < 1e-9  # the model is still task 1's: nothing to pull back

    # Moved, it pays for the change of the merged weights: strength/2 * sum F (W_now - W_task1)^2.
    with torch.no_grad():
        for name, parameter in fresh.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0, 0.05)
    penalty = ewc.extra_loss(fresh, batch, None)
    merged_now = merge_for_export(copy.deepcopy(fresh)).state_dict()
    expected = sum((ewc.fisher[name] * (merged_now[name].float() - ewc.anchor[name]) ** 2).sum() for name in ewc.fisher)
    assert expected > 0
    assert penalty.item() == pytest.approx(100.0 / 2 * expected.item(), rel=1e-4)
    penalty.backward()
    assert all(p.grad is not None for name, p in fresh.named_parameters() if ".lora_B." in name)


def test_ewc_fisher_under_an_adapter_is_the_fisher_of_the_merged_weights():
    """At B = 0 the LoRA model is the plain model, so the Fisher of its adapted weights equals full tuning's."""
    model, tokenizer = tiny("phi3")
    examples = encoded(tokenizer, 0)
    full = diagonal_fisher(apply_tuning(copy.deepcopy(model), TuningConfig(method="full")), examples, 4, tokenizer.pad_token_id)
    adapted_model = apply_tuning(copy.deepcopy(model), LORA)
    adapted = diagonal_fisher(adapted_model, examples, 4, tokenizer.pad_token_id)
    assert set(adapted) == {f"model.layers.{i}.{m}.weight" for i in range(2)
                            for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    for name, value in adapted.items():
        torch.testing.assert_close(value, full[name], rtol=1e-4, atol=1e-12)
    assert all(not p.requires_grad or ".lora_" in name for name, p in adapted_model.named_parameters())  # base weights refrozen


AVERAGING = [{"name": "averaging", "alpha": 0.25}]


@pytest.mark.parametrize("tuning", [LORA, TuningConfig(method="mora", r=4), TuningConfig(method="osf")], ids=lambda t: t.method)
def test_averaging_under_an_adapter_averages_the_task_start_and_end_models(tuning):
    model, tokenizer = tiny("llama")
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    plugins = build_plugins(AVERAGING, seed=0)
    torch.manual_seed(100)
    tuned = apply_tuning(model, tuning)
    context = TaskContext(0, "task-0", tuned, encoded(tokenizer, 0), tokenizer.pad_token_id)
    plugins[0].before_task(context)
    train(tuned, context.train_examples, OPTIM, seed=0, pad_token_id=tokenizer.pad_token_id)
    end = merge_for_export(copy.deepcopy(tuned)).state_dict()
    plugins[0].after_task(context)
    averaged = merge_for_export(tuned).state_dict()
    moved = [name for name in start if not torch.equal(end[name], start[name])]
    assert moved and all(name.endswith("proj.weight") for name in moved)
    for name in start:
        torch.testing.assert_close(averaged[name], 0.25 * start[name] + 0.75 * end[name], rtol=1e-5, atol=1e-6)


def test_trained_weights_name_what_the_export_holds():
    model, _ = tiny("gpt2")
    names = {weight.name for weight in trained_weights(apply_tuning(copy.deepcopy(model), LORA))}
    exported = dict(model.named_parameters())
    assert names and names <= set(exported)
    assert names == {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    full = {weight.name for weight in trained_weights(apply_tuning(copy.deepcopy(model), TuningConfig(method="full")))}
    assert full == set(exported)


OLORA = [{"name": "olora", "lambda_orth": 0.5}]


def test_olora_refuses_earlier_subspaces_of_other_layers():
    model, tokenizer = tiny("llama")
    plugins = build_plugins(OLORA, seed=0)
    tuned, _ = run_task(model, tokenizer, plugins, 0, TuningConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"]))
    (olora,) = next_task_plugins(plugins, OLORA)
    other = apply_tuning(merge_for_export(tuned), TuningConfig(method="lora", r=4, target_modules=["q_proj", "o_proj"]))
    with pytest.raises(ValueError, match="keep tuning.target_modules"):
        olora.before_task(TaskContext(1, "task-1", other, encoded(tokenizer, 1), tokenizer.pad_token_id))


SEEKR = [{"name": "seekr", "samples_per_task": 2, "replay_batch_size": 2, "layer_budget": 1, "head_budget": 2}]


def test_seekr_teacher_is_the_model_the_next_task_starts_from():
    """Its stored maps and logits are outputs of task 1's model; the merged model plus a fresh adapter gives them back."""
    model, tokenizer = tiny("phi3")
    plugins = build_plugins(SEEKR, seed=0)
    tuned, _ = run_task(model, tokenizer, plugins, 0)
    (seekr,) = next_task_plugins(plugins, SEEKR)
    torch.manual_seed(101)
    fresh = apply_tuning(merge_for_export(tuned), LORA)
    fresh.eval()
    replay = collate(seekr.memory, tokenizer.pad_token_id)
    with torch.no_grad():
        student = fresh(**replay, output_attentions=True)
        assert seekr._logits_kl(student.logits, replay, seekr.memory).item() < 1e-6
        assert seekr._attention_kl(student.attentions, seekr.memory).item() < 1e-6
