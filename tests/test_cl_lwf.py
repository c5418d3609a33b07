import pytest
import torch
import torch.nn.functional as F

from models.cl.lwf import LwFPlugin, distillation_kl
from models.data import collate
from tests.test_cl_common import (
    HELD_OUT,
    PAD,
    TRAIN,
    context,
    model_after_task1,
    plain_after_task2,
    run_task,
    task_loss,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def output_drift(model, reference, examples) -> float:
    """Mean per-position KL(reference || model) of next-token distributions on `examples`."""
    batch = collate(examples, PAD)
    with torch.no_grad():
        ref = F.log_softmax(reference(**batch).logits, -1)
        new = F.log_softmax(model(**batch).logits, -1)
    per_position = (ref.exp() * (ref - new)).sum(-1)
    mask = batch["attention_mask"].float()
    return float((per_position * mask).sum() / mask.sum())


def test_distillation_kl_is_zero_for_equal_logits_and_matches_the_formula():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert distillation_kl(teacher, teacher, mask, 2.0).item() == 0.0
    p = F.softmax(teacher / 2, -1)
    kl = (p * (F.log_softmax(teacher / 2, -1) - F.log_softmax(student / 2, -1))).sum(-1)
    expected = 4 * kl[mask.bool()].mean()
    assert torch.allclose(distillation_kl(student, teacher, mask, 2.0), expected)
    # Pad positions do not count, whatever the logits there.
    changed = student.clone()
    changed[0, 3:] += 100
    assert torch.allclose(distillation_kl(changed, teacher, mask, 2.0), expected)


def test_teacher_is_a_frozen_snapshot_of_the_task_start_model():
    model = model_after_task1()
    plugin = LwFPlugin(weight=1.0, temperature=2.0)
    plugin.before_task(context(model, 1))
    assert all(not p.requires_grad for p in plugin.teacher.parameters()) and not plugin.teacher.training
    batch = collate(TRAIN[1][:4], PAD)
    assert plugin.extra_loss(model, batch, model(**batch)).item() == 0.0  # student == teacher
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    assert plugin.extra_loss(model, batch, model(**batch)).item() > 0  # the teacher did not move with it


def test_lwf_keeps_outputs_on_task_one_inputs_closer_to_the_pre_task_two_model():
    before = model_after_task1()
    model = model_after_task1()
    run_task(model, 1, [LwFPlugin(weight=1.0, temperature=2.0)])
    plain = plain_after_task2()
    assert output_drift(model, before, HELD_OUT[0]) < 0.5 * output_drift(plain, before, HELD_OUT[0])
    assert task_loss(model, HELD_OUT[0]) < task_loss(plain, HELD_OUT[0])
    assert task_loss(model, HELD_OUT[1]) < 0.25 * task_loss(before, HELD_OUT[1])  # task 2 still learnt
