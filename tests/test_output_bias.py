"""Forgetting as output bias: a narrow task pulls a fully fine-tuned model's outputs towards its answer tokens.

A tiny Llama learns a "general" language (a Markov chain over most of the vocabulary), then a
narrow task whose answers are always one of eight reserved "number" tokens. Full fine-tuning
learns the task and moves nearly all next-token mass on general prompts onto those tokens;
tuning only the attention projections learns it too (more slowly at this size) and moves far less.
"""

from __future__ import annotations

import copy

import pytest
import torch

from models.engine import train
from models.tuning import apply_tuning
from perennial.config import OptimConfig, TuningConfig
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

VOCAB = 64
GENERAL = (3, 56)  # token ids [3, 56) are the general language; [56, 64) are the task's answers
ANSWERS = range(56, 64)


class World:
    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(*GENERAL, (VOCAB, 3), generator=self.generator)

    def sentence(self, length: int) -> list[int]:
        token = int(torch.randint(*GENERAL, (1,), generator=self.generator))
        tokens = [token]
        for _ in range(length - 1):
            token = int(self.successors[token, int(torch.randint(0, 3, (1,), generator=self.generator))])
            tokens.append(token)
        return tokens

    def task_example(self) -> dict:
        prompt = self.sentence(8)
        answer = ANSWERS[prompt[0] % len(ANSWERS)]
        return {"input_ids": prompt + [answer], "labels": [-100] * len(prompt) + [answer]}


def answer_mass_and_accuracy(model, probes: list[list[int]], task: list[dict]) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor(probes)).logits[:, -1], dim=-1)
        logits = model(torch.tensor([example["input_ids"][:-1] for example in task])).logits[:, -1]
    answers = torch.tensor([example["input_ids"][-1] for example in task])
    model.train()
    return probs[:, ANSWERS.start:].sum(-1).mean().item(), (logits.argmax(-1) == answers).float().mean().item()


def test_full_fine_tuning_shifts_general_outputs_to_the_task_tokens_and_attn_proj_much_less():
    world = World(seed=0)
    base = tiny_model("llama", vocab_size=VOCAB, attn_implementation=None, hidden_size=64, intermediate_size=128,
                      num_key_value_heads=4, max_position_embeddings=64)
    general = [{"input_ids": s, "labels": s} for s in (world.sentence(24) for _ in range(400))]
    train(base, general, OptimConfig(lr=3e-3, max_steps=150, batch_size=16, warmup_steps=5), seed=0, pad_token_id=0)
    task = [world.task_example() for _ in range(400)]
    probes, held_out = [world.sentence(8) for _ in range(64)], [world.task_example() for _ in range(64)]
    base_mass, _ = answer_mass_and_accuracy(base, probes, held_out)

    results = {}
    for method in ("full", "attn-proj"):
        model = apply_tuning(copy.deepcopy(base), TuningConfig(method=method))
        train(model, task, OptimConfig(lr=3e-3, max_steps=150, batch_size=16, warmup_steps=5), seed=0, pad_token_id=0)
        results[method] = answer_mass_and_accuracy(model, probes, held_out)

    (full_mass, full_accuracy), (attn_mass, attn_accuracy) = results["full"], results["attn-proj"]
    chance = 1 / len(ANSWERS)
    assert base_mass < 0.05
    assert full_accuracy > 4 * chance and full_mass > 0.9  # learned, and general prompts now answer with task tokens
    assert attn_accuracy > 2 * chance  # learned (less at this size and budget) ...
    assert attn_mass < full_mass - 0.2  # ... with much less of the output bias
