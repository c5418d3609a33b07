"""Every CL plugin under FSDP2 trains what it trains in one process, holding 1/W of its per-weight state (issue #48).

The test starts this file twice as a script (rank 0 and 1, torchrun's environment variables, gloo on
the CPU). Each rank runs, for every case in turn, the two-task sequence a lineage runs, as the stage
runner does it under FSDP (tasks/stage.py: the model sharded before the plugins' first hook): task 1
with the plugin; its state gathered and written as a version stores it; task 2 with a fresh plugin
that reads that state back (cut to this rank's shards), a mid-task checkpoint on the way. The cases:
each of the six plugins alone, and EWC, O-LoRA, LwF and averaging together on LoRA. Meanwhile the
test's own process runs the same sequences in one process, and the controls. Then it compares, per case:

- losses, final weights and the plugin state written after each task and in the checkpoint within the
  tolerance tests/test_distributed.py holds DDP and FSDP to (losses 1e-4 relative, weights rtol 1e-4 /
  atol 2e-5), while the control, the same sequence without the plugin (O-LoRA: without its penalties),
  ends more than 1e-3 away: the plugin changed what was trained, and FSDP kept that change;
- the FSDP run's mid-task checkpoint, plugin state gathered whole, resumed in one process, ends where the
  one-process run ends;
- the bytes each rank holds of the plugin's tensors (`models.cl.base.held_bytes`, at its largest after
  each hook): at most 0.6 of one process's for the plugins whose state is per weight (EWC's Fisher and
  anchor, LwF's teacher, averaging's and merge's task-start weights). SEEKR (stored samples and maps)
  and O-LoRA (the small LoRA A matrices, whole by design) hold the same on every rank.

Examples are equal-length with equal prompt lengths (tests/test_cl_common.py's task sequence), so every
rank supervises the same number of tokens and the runs differ by float summation order only. One spawn
for all the cases keeps the cost to one interpreter start per rank.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when a rank runs this file as a script
    sys.path.insert(0, str(REPO))

from models.cl.base import TaskContext, held_bytes  # noqa: E402
from models.cl.registry import build_plugins  # noqa: E402
from models.engine import (full_state_dict, load_plugin_states, plugin_state_file, plugin_states, save_plugin_states,  # noqa: E402
                           shard_model, train)
from perennial.config import OptimConfig  # noqa: E402
from tests.gloo_ranks import WORLD, gloo_ranks  # noqa: E402
from tests.test_cl_common import HELD_OUT, PAD, TRAIN, lora_model, tiny_model  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")]

# lr 3e-3 as tests/test_distributed.py: at 1e-2 AdamW's normalised first steps amplify float-order noise (DDP
# and FSDP alike ended 1.9e-3 from one process after LwF's two tasks; FSDP and DDP 2e-9 from each other).
CFG = OptimConfig(lr=3e-3, max_steps=4, batch_size=4, grad_accum=2, warmup_steps=0, schedule="constant", checkpoint_every=2,
                  log_every=1000)
RESUME_STEP = 2
EXAMPLES = 32  # of each task: 4 steps x 2 micro-batches x 4 read 32
# Strong enough that each changes the weights well beyond the tolerance in a few steps.
METHODS = {
    "ewc": {"name": "ewc", "strength": 1e4, "fisher_samples": 4},
    "lwf": {"name": "lwf", "weight": 1.0},
    "seekr": {"name": "seekr", "samples_per_task": 4, "replay_batch_size": 2, "layer_budget": 1, "head_budget": 2},
    "olora": {"name": "olora", "lambda_orth": 1.0, "lambda_l2": 0.01},
    "averaging": {"name": "averaging", "alpha": 0.5},
    "merge": {"name": "merge", "coefficients": [0.25, 0.5], "validation_records": 8},
}
# case -> (method configs, LoRA or full tuning). Full tuning trains every tensor, the root unit's embeddings
# and head too. The last case runs the per-weight plugins on LoRA's merged weights (`trained_weights` of an
# adapter: DTensor LoRA products, the Fisher of a frozen base weight, LwF swapping only LoRA shards), with
# O-LoRA folding every task's update into them and its L2 term holding LoRA B for backward while LwF swaps it.
CASES = {**{method: ([config], method == "olora") for method, config in METHODS.items()},
         "lora-ewc-olora-lwf-averaging": ([METHODS[m] for m in ("ewc", "olora", "lwf", "averaging")], True)}
PER_WEIGHT = ("ewc", "lwf", "averaging", "merge")  # state shaped like the weights: sharded like them
# The controls: full tuning or LoRA without a plugin; for O-LoRA, its folding without its penalties (the part
# that gathers the LoRA A matrices), since folding alone already changes every base weight.
CONTROLS = {"full": ([], False), "lora": ([], True), "olora": ([{**METHODS["olora"], "lambda_orth": 0.0, "lambda_l2": 0.0}], True)}


def control_of(case: str) -> str:
    return case if case == "olora" else "lora" if CASES[case][1] else "full"


def input_model(lora: bool) -> torch.nn.Module:
    return lora_model() if lora else tiny_model()


def context(model, task: int) -> TaskContext:
    # Merge scores held-out records of the task and, from the second task on, records of the first.
    return TaskContext(task_index=task, task_name=f"task-{task}", model=model, train_examples=TRAIN[task][:EXAMPLES],
                       pad_token_id=PAD, validation_examples=HELD_OUT[task][:8], retention_examples=HELD_OUT[0][:8] if task else [])


def run_sequence(methods: list[dict], model: torch.nn.Module, out: Path, *, sharded: bool, task2_start: list | None = None) -> dict:
    """Task 1 then task 2 with the plugins of ``methods`` (method configs), as a lineage's stages run them.

    Returns the losses of each task and the largest `held_bytes` seen after each hook. Writes (rank 0) the
    state after task 1 to ``out/task1``, the final plugin state to ``out/final`` and the mid-task-2 checkpoint
    under ``out/checkpoints``; ``task2_start`` gets a copy of the model task 2 starts from (one process only).
    """
    rank = dist.get_rank() if sharded else 0
    make = lambda: build_plugins(methods, seed=5)  # noqa: E731
    if sharded:
        shard_model(model, torch.device("cpu"))
    strategy = "fsdp" if sharded else "ddp"
    plugins, held, losses = make(), 0, []
    holding = lambda: sum(held_bytes(plugin, model) for plugin in plugins)  # noqa: E731
    for task in (0, 1):
        if task == 1:  # the next stage: fresh plugins that read the state the previous one stored
            plugins = make()
            load_plugin_states(plugins, out / "task1")
            if task2_start is not None:
                task2_start.append(copy.deepcopy(model))
        ctx = context(model, task)
        for plugin in plugins:
            plugin.before_task(ctx)
        held = max(held, holding())
        checkpoints = {"checkpoint_dir": out / "checkpoints", "checkpoint_fn": lambda step, path: None} if task else {}
        result = train(model, ctx.train_examples, CFG, seed=task, pad_token_id=PAD, plugins=plugins, strategy=strategy,
                       **checkpoints)
        losses.append(result.losses)
        for plugin in plugins:
            plugin.after_task(ctx)
        held = max(held, holding())
        states = plugin_states(plugins)  # a collective under FSDP
        if rank == 0:
            save_plugin_states(plugins, out / ("task1" if task == 0 else "final"), states)
        if sharded:
            dist.barrier()  # rank 0 wrote the state every rank reads next
    return {"losses": losses, "held_bytes": held}


def _worker(out_dir: Path) -> None:
    """One rank: every case's sequence under FSDP2, each from the same input model as one process."""
    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'rendezvous'}",
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    rank = dist.get_rank()
    results = {}
    for case, (methods, lora) in CASES.items():
        model = input_model(lora)
        results[case] = run_sequence(methods, model, out_dir / "fsdp" / case, sharded=True)
        weights = full_state_dict(model)  # gathered to rank 0; every rank calls it
        if rank == 0:
            save_file({name: value.contiguous() for name, value in weights.items()}, out_dir / "fsdp" / case / "weights.safetensors")
    (out_dir / f"result-{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the two ranks, run every sequence in this process meanwhile, then collect both."""
    out_dir = tmp_path_factory.mktemp("cl-fsdp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from threads, and the ranks need the cores
    try:
        with gloo_ranks(__file__, out_dir) as ranks:
            single = {}
            for case, (methods, lora) in CASES.items():
                model, start = input_model(lora), []
                result = run_sequence(methods, model, out_dir / "single" / case, sharded=False, task2_start=start)
                single[case] = {**result, "weights": _weights(model), "task2_start": start[0]}
            controls = {}
            for name, (methods, lora) in CONTROLS.items():
                model = input_model(lora)
                run_sequence(methods, model, out_dir / "control" / name, sharded=False)
                controls[name] = _weights(model)
            ranks.wait(timeout=300)
    finally:
        torch.set_num_threads(threads)
    fsdp = [json.loads((out_dir / f"result-{rank}.json").read_text()) for rank in range(WORLD)]
    return out_dir, single, controls, fsdp


def _assert_weights_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=2e-5, msg=name)


def _plugin_files(directory: Path, case: str) -> list[tuple[dict, dict]]:
    """(tensors, meta) of each plugin of ``case``, as `save_plugin_states` wrote them under ``directory``."""
    stems = [directory / plugin_state_file(position, config["name"]).removesuffix(".json")
             for position, config in enumerate(CASES[case][0])]
    return [(load_file(f"{stem}.safetensors"), json.loads(Path(f"{stem}.json").read_text())) for stem in stems]


@pytest.mark.parametrize("case", list(CASES))
def test_each_plugin_under_fsdp_trains_what_one_process_trains(runs, case):
    out_dir, single, controls, fsdp = runs
    rank0, rank1 = (result[case] for result in fsdp)
    assert rank0["losses"] == rank1["losses"]  # global losses: the same on every rank
    for task in (0, 1):
        assert rank0["losses"][task] == pytest.approx(single[case]["losses"][task], rel=1e-4)
    expected = single[case]["weights"]
    _assert_weights_close(load_file(out_dir / "fsdp" / case / "weights.safetensors"), expected)
    # The control: without the plugin (O-LoRA: without its penalties) the same sequence ends far outside it.
    control = controls[control_of(case)]
    assert max((expected[name] - control[name]).abs().max().item() for name in expected) > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_plugin_state_under_fsdp_is_written_whole_as_one_process_writes_it(runs, case):
    out_dir = runs[0]
    for stage in ("task1", "final", f"checkpoints/step-{RESUME_STEP:08d}"):
        for (fsdp_tensors, fsdp_meta), (tensors, meta) in zip(*(_plugin_files(out_dir / world / case / stage, case)
                                                                 for world in ("fsdp", "single"))):
            assert fsdp_tensors.keys() == tensors.keys(), stage
            for key, value in tensors.items():
                assert fsdp_tensors[key].shape == value.shape and fsdp_tensors[key].dtype == value.dtype, (stage, key)
                if value.numel():  # not "_empty", a plugin without tensors
                    # Scaled to each tensor: a Fisher's entries are squared gradients, far below the weights' atol.
                    torch.testing.assert_close(fsdp_tensors[key], value, rtol=1e-4, atol=1e-4 * float(value.abs().max()),
                                               msg=(stage, key))
            assert fsdp_meta == meta, stage  # merge's curves, SEEKR's selected heads and samples: the same choices


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_checkpoint_with_plugin_state_resumes_in_one_process(runs, case, single_torch_thread):
    """The mid-task checkpoint FSDP wrote (plugin state gathered) resumes in one process and ends where it ends."""
    out_dir, single, _, _ = runs
    model = copy.deepcopy(single[case]["task2_start"])
    plugins = build_plugins(CASES[case][0], seed=5)
    load_plugin_states(plugins, out_dir / "single" / case / "task1")
    ctx = context(model, 1)
    for plugin in plugins:
        plugin.before_task(ctx)
    resumed = train(model, ctx.train_examples, CFG, seed=1, pad_token_id=PAD, plugins=plugins,
                    resume_from=out_dir / "fsdp" / case / "checkpoints" / f"step-{RESUME_STEP:08d}")
    for plugin in plugins:
        plugin.after_task(ctx)
    assert resumed.resumed_from == RESUME_STEP
    assert resumed.losses == pytest.approx(single[case]["losses"][1], rel=1e-4)
    _assert_weights_close(_weights(model), single[case]["weights"])


def test_each_rank_holds_a_share_of_the_per_weight_plugin_state(runs):
    _, single, _, fsdp = runs
    fractions = {case: max(result[case]["held_bytes"] for result in fsdp) / single[case]["held_bytes"] for case in CASES}
    print("plugin state held per rank under 2 FSDP ranks / one process:",
          ", ".join(f"{case} {fraction:.3f}" for case, fraction in fractions.items()))
    for case in PER_WEIGHT:
        assert fractions[case] <= 0.6, (case, fractions)
    # Not shaped like the weights: SEEKR's samples and maps, O-LoRA's whole A matrices, the same on each rank.
    assert fractions["seekr"] == pytest.approx(1.0) and fractions["olora"] == pytest.approx(1.0)


if __name__ == "__main__":  # a rank started by the `runs` fixture
    _worker(Path(sys.argv[1]))
