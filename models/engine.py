"""The training loop for DAP and CIT, readable top to bottom.

One function, `train`, runs `cfg.max_steps` optimizer steps over a list of encoded examples: the loop
on one screen, its parts named below it (`setup`, `train_step`, `checkpoint`).
What makes it exactly resumable:
- the data position is a pure function of (seed, step): micro-batch m reads stream positions
  m*B .. m*B+B-1 of a sequence of per-epoch permutations, so a resumed run reads the same
  examples a straight run would;
- a checkpoint holds the trainable weights, optimizer and scheduler state, RNG states and the
  plugins' state, all as safetensors + JSON (never pickle).
A step whose loss or gradient norm is nan or inf stops the run (`NonFiniteLossError`) before it
changes a weight or saves a checkpoint.
Under `torchrun` (torch.distributed initialised) the model is wrapped in DDP, or sharded with
FSDP2 (`strategy="fsdp"`), and each rank takes its slice of every global micro-batch; the
reported loss and token count are global (averaged / summed over ranks), so every rank logs and
checkpoints the same history. Under FSDP a checkpoint gathers whole tensors to rank 0 and a
resume scatters them again, so its files are the same as a single process's.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from models.allocator import keeping_freed_memory
from models.atomic import atomic_dir
from models.cl.base import CLPlugin, PluginState, reshard, whole
from models.data import collate
from models.families import max_positions
from perennial.config import DistributedStrategy, stream_seed

StepHook = Callable[[int, torch.nn.Module], None]
LogFn = Callable[[dict[str, float], int], None]
CheckpointFn = Callable[[int, Path], None]
Strategy = DistributedStrategy


class NonFiniteLossError(FloatingPointError):
    """A training step's loss or gradient norm was nan or inf; the message names the stage and the step.

    Raised before that step's optimizer update, so the weights are those after the previous step
    and no checkpoint exists for this step or a later one. Not transient: a rerun resumes from the
    last checkpoint and meets the same step again, so it must not be retried.
    """


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # Under torchrun each process drives the GPU of its LOCAL_RANK, not all of them cuda:0.
        local_rank = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(local_rank)) if local_rank is not None else torch.device("cuda")
    return torch.device(name)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


Precision = Literal["auto", "fp32", "bf16"]


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX, Arm BF16), read from /proc/cpuinfo.

    Without it, autocast to bf16 on the CPU emulates the type and runs slower than fp32.
    False where /proc/cpuinfo is absent (macOS, Windows): fp32 is then the safe choice.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in ("avx512_bf16", "amx_bf16", "bf16") for flag in flags)


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The dtype the forward pass autocasts to, or None for plain fp32.

    ``auto``: bf16 on CUDA and on CPUs with native bf16 (`cpu_has_native_bf16`), else fp32.
    The weights, their gradients and the optimizer state stay fp32 either way (master weights):
    autocast only runs the matmuls and attention in bf16. Raises ValueError for ``bf16`` on a
    device type without bf16 autocast.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"precision bf16 is not supported on device {device}; use precision=fp32")
        return torch.bfloat16
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return None


def precision_context(precision: Precision, device: torch.device):
    """``torch.autocast`` for `autocast_dtype`, or a no-op context for fp32."""
    dtype = autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; check tuning.method / trainable_regex")
    # optim.fused_adamw: one fused kernel over all tensors, not bit-identical to the per-tensor loop (docs/training.md)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **({"fused": True} if cfg.fused_adamw else {}))


def lr_multiplier(step: int, cfg) -> float:
    """Linear warmup, then cosine or linear decay to 10% (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return 1.0 - 0.9 * progress
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def stream_indices(num_examples: int, seed: int, start: int, count: int, shuffle: bool = True) -> list[int]:
    """Example indices at stream positions [start, start+count): epochs of seeded permutations,
    or the list order itself when ``shuffle`` is off (an order the caller built, e.g. interleaved replay)."""
    if not shuffle:
        return [position % num_examples for position in range(start, start + count)]
    indices = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, num_examples)
        indices.append(int(_epoch_permutation(num_examples, seed, epoch)[offset]))
    return indices


@functools.lru_cache(maxsize=2)  # the current epoch, and the previous one while a batch straddles both
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """Built once per epoch, not per micro-batch: a randperm of 100k examples costs ~30 ms.

    Callers only read it (the cache hands every caller the same tensor).
    """
    generator = torch.Generator().manual_seed(stream_seed(seed, epoch))
    return torch.randperm(num_examples, generator=generator)


# --- checkpoint state (safetensors + JSON only) ------------------------------------------------


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous().clone() for name, p in model.named_parameters() if p.requires_grad}


def trainable_names(model: torch.nn.Module) -> list[str]:
    """In the optimizer's parameter order (build_optimizer), so position i is optimizer index i."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module, device: torch.device) -> None:
    """FSDP2 over all ranks: each transformer block is one unit (its parameters gathered just
    before it runs and freed after), the embeddings, final norm and head another at the root.

    The blocks are the model's `_no_split_modules` (transformers names them, e.g.
    LlamaDecoderLayer); found through any peft wrapper.
    """
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    block_types = set()
    for module in model.modules():
        block_types.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in block_types]
    for block in blocks:  # collected first: fully_shard changes each module's class
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


_FULL_TO_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model state on the CPU, e.g. to export after training.

    Under FSDP the shards are gathered to rank 0: a collective, every rank must call it; the
    other ranks get an empty dict.
    """
    if is_sharded(model):
        return get_model_state_dict(model, options=_FULL_TO_RANK0)
    return {name: value.detach().cpu() for name, value in model.state_dict().items()}


def _checkpoint_tensors(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Trainable weights and the optimizer state as one process holds them (whole tensors, the
    state keyed by parameter index). Under FSDP a collective: rank 0 gets them, the others empty dicts."""
    if not is_sharded(model):
        return trainable_state(model), optimizer.state_dict()
    names = trainable_names(model)
    weights = get_model_state_dict(model, options=_FULL_TO_RANK0)
    optim = get_optimizer_state_dict(model, optimizer, options=_FULL_TO_RANK0)
    if not weights:
        return {}, {}
    # get_optimizer_state_dict keys by parameter name; the checkpoint format keys by index.
    index = {name: position for position, name in enumerate(names)}
    return {name: weights[name].contiguous() for name in names}, {
        "state": {index[name]: slot for name, slot in optim["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]} for group in optim["param_groups"]],
    }


def plugin_state_file(position: int, name: str) -> str:
    """The JSON file of the ``position``-th CL plugin's state in a plugin-state folder (its tensors: the
    same stem, .safetensors)."""
    return f"plugin-{position}-{name}.json"


def plugin_states(plugins: Sequence[CLPlugin]) -> list[PluginState]:
    """Each plugin's state as one process holds it, whole tensors: DTensor state (sharded like the weights under
    FSDP2, models/cl/base.py) is gathered, one tensor at a time, and kept on rank 0 only (on the CPU; the
    other ranks get no tensors). A collective when any state is a DTensor, as under FSDP2: every rank calls it.
    """
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    states = []
    for plugin in plugins:
        state, tensors = plugin.state_dict(), {}
        for key, value in state.tensors.items():  # the same keys in the same order on every rank
            value = whole(value)
            if rank == 0:
                tensors[key] = value.detach().cpu()
        states.append(PluginState(tensors, state.meta))
    return states


def save_plugin_states(plugins: Sequence[CLPlugin], directory: Path, states: Sequence[PluginState] | None = None) -> None:
    """Each plugin's tensors as safetensors and the rest as JSON (safetensors refuses an empty file).

    ``states``: from `plugin_states`, when the model is sharded (gathering them is a collective every rank
    joins, while only rank 0 writes); by default the plugins' own, which must then hold no DTensor.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for position, plugin in enumerate(plugins):
        state = states[position] if states is not None else plugin.state_dict()
        stem = directory / plugin_state_file(position, plugin.name).removesuffix(".json")
        save_file(state.tensors or {"_empty": torch.zeros(0)}, f"{stem}.safetensors")
        Path(f"{stem}.json").write_text(json.dumps(state.meta))


def load_plugin_states(plugins: Sequence[CLPlugin], directory: Path) -> None:
    for position, plugin in enumerate(plugins):
        stem = directory / plugin_state_file(position, plugin.name).removesuffix(".json")
        if not Path(f"{stem}.json").exists():
            raise FileNotFoundError(f"{directory} has no state for plugin {plugin.name}; did the method list change mid-run?")
        tensors = {k: v for k, v in load_file(f"{stem}.safetensors").items() if k != "_empty"}
        plugin.load_state_dict(PluginState(tensors, json.loads(Path(f"{stem}.json").read_text())))


def save_state(
    directory: Path, model, optimizer, scheduler, step: int, losses: list[float], plugins: Sequence[CLPlugin] = ()
) -> None:
    """Write a checkpoint folder. For a sharded (FSDP) model every rank must call it (the tensors, the CL
    plugins' sharded state included, are gathered); rank 0 writes, the files the same as a single process
    would write."""
    weights, optim = _checkpoint_tensors(model, optimizer)
    states = plugin_states(plugins)  # under FSDP gathered like the weights
    if is_sharded(model) and dist.get_rank() != 0:
        return
    # All or nothing: a save that dies (disk full, kill) leaves no half checkpoint under `directory`.
    with atomic_dir(directory) as scratch:
        _write_state(scratch, weights, optim, scheduler, step, losses, plugins, states)


def _write_state(directory: Path, weights, optim, scheduler, step: int, losses: list[float], plugins: Sequence[CLPlugin],
                 states: Sequence[PluginState]) -> None:
    save_file(weights, directory / "trainable.safetensors")
    tensors, scalars = {}, {}
    for index, slot in optim["state"].items():
        for key, value in slot.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors or {"_empty": torch.zeros(0)}, directory / "optimizer.safetensors")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, directory / "rng.safetensors")
    save_plugin_states(plugins, directory, states)
    meta = {
        "step": step,
        "losses": losses,
        "param_groups": optim["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "python_random": repr(random.getstate()),
    }
    (directory / "state.json").write_text(json.dumps(meta))


def load_state(directory: Path, model, optimizer, scheduler, plugins: Sequence[CLPlugin] = ()) -> tuple[int, list[float]]:
    """Restore a checkpoint folder. A sharded (FSDP) model takes each rank's shard of the whole
    tensors in the files; every rank must call it with the same folder."""
    meta = json.loads((directory / "state.json").read_text())
    weights = load_file(directory / "trainable.safetensors")
    missing = set(weights) - {name for name, _ in model.named_parameters()}
    if missing:
        raise ValueError(f"checkpoint {directory} holds parameters the model lacks: {sorted(missing)[:5]}")
    if is_sharded(model):
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(weights, strict=False)
    # The saved param groups would set the optimizer's kernel: a resume under the other optim.fused_adamw is refused
    written, wanted = (any(group.get("fused") for group in groups) for groups in (meta["param_groups"], optimizer.param_groups))
    if written != wanted:
        raise ValueError(f"checkpoint {directory} was written with optim.fused_adamw={str(written).lower()}, this run has "
                         f"{str(wanted).lower()}: the two AdamW steps differ in the last bits, so a resumed run would match neither; "
                         f"resume with optim.fused_adamw={str(written).lower()}")
    tensors = load_file(directory / "optimizer.safetensors")
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["optimizer_scalars"].items()):
        if key == "_empty":
            continue
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    if is_sharded(model):
        names = trainable_names(model)
        by_name = {
            "state": {names[index]: slot for index, slot in state.items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in meta["param_groups"]],
        }
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    rng = load_file(directory / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_tuples(ast.literal_eval(meta["python_random"])))
    load_plugin_states(plugins, directory)
    return meta["step"], meta["losses"]


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# --- the loop -----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@keeping_freed_memory  # no page faults on buffers every step reallocates: +25% tokens/s on CPU
def train(
    model: torch.nn.Module,
    examples: Sequence[dict],
    cfg,
    *,
    seed: int,
    pad_token_id: int,
    device: torch.device | None = None,
    plugins: Sequence[CLPlugin] = (),
    resume_from: Path | None = None,
    checkpoint_fn: CheckpointFn | None = None,
    checkpoint_dir: Path | None = None,
    log_fn: LogFn | None = None,
    on_step_end: StepHook | None = None,
    desc: str = "train",
    shuffle: bool = True,
    strategy: Strategy = "ddp",
    precision: Precision = "fp32",
) -> TrainResult:
    """Run optimizer steps up to ``cfg.max_steps`` (an OptimConfig); resume from a saved state if given.

    ``precision`` (`autocast_dtype`): ``auto`` autocasts the forward pass to bf16 on CUDA and on
    CPUs with native bf16, keeping fp32 master weights and optimizer state; ``fp32`` (the default
    here; the config's default is ``auto``) never does. A resumed run takes the same steps on the
    same batches as an uninterrupted one. In fp32 its losses are almost always equal bit for bit,
    but two processes have once rounded a step 1 ulp apart (a CIT stage's step 10 on the CPU,
    4.7588634 vs 4.7588630); in bf16 runs in different processes differ in the last bits (measured
    on CPU: 4.996416 vs 4.996412 at step 5).

    ``strategy`` matters only under torch.distributed: "ddp" wraps the model, "fsdp" shards it
    in place (it stays sharded after training: export through `full_state_dict`). Under FSDP
    every rank must pass ``checkpoint_fn`` (or none): writing a checkpoint is a collective.

    ``cfg.activation_checkpointing`` recomputes each transformer block's forward pass during
    backward instead of keeping its activations (`activation_checkpointing`): less memory, one
    more forward per step, the same losses and weights. ``cfg.compile`` runs the loop's forward
    and backward under torch.compile (the model itself stays eager): losses equal eager ones to
    about 1e-6 relative, not bit for bit.
    """
    with activation_checkpointing(model, cfg.activation_checkpointing):
        run = setup(model, examples, cfg, seed=seed, pad_token_id=pad_token_id, device=device, plugins=plugins,
                    resume_from=resume_from, desc=desc, shuffle=shuffle, strategy=strategy, precision=precision)
        started = time.perf_counter()
        progress = tqdm(total=cfg.max_steps, initial=run.start_step, desc=desc, disable=run.rank != 0, leave=False)
        for step in range(run.start_step, cfg.max_steps):
            try:
                loss = train_step(run, step)
            except NonFiniteLossError:
                progress.close()
                raise
            done = step + 1
            run.losses.append(loss)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
            if log_fn and run.rank == 0 and (done % cfg.log_every == 0 or done == cfg.max_steps):
                log_fn({"loss": loss, "lr": run.scheduler.get_last_lr()[0]}, done)
            if on_step_end:
                on_step_end(done, model)
            if checkpoint_fn and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
                checkpoint(run, done, checkpoint_dir or Path("checkpoints"), checkpoint_fn)
        progress.close()
    model.eval()
    seconds = time.perf_counter() - started
    return TrainResult(steps=cfg.max_steps, losses=run.losses, tokens=global_tokens(run), seconds=seconds, resumed_from=run.start_step)


@contextlib.contextmanager
def activation_checkpointing(model: torch.nn.Module, enabled: bool):
    """Activation (gradient) checkpointing of every transformer block while the block is open.

    transformers' own: each `GradientCheckpointingLayer` (a decoder block) runs its forward
    under non-reentrant `torch.utils.checkpoint` in training mode, keeping only its inputs, and
    runs it again during backward. Non-reentrant because it works when no input of a block
    requires grad (frozen embeddings: attn-proj, mlp-gate-up, LoRA), under DDP without
    `static_graph`, and with the keyword arguments the blocks take; transformers also hooks
    the input embeddings so their output requires grad (`enable_input_require_grads`), as
    PEFT expects. The recomputation replays the same operations on the same inputs, with the
    RNG and autocast state of the first pass restored, so losses and gradients are bit-identical
    to a run without it (tests/test_activation_checkpointing.py). Found through peft wrappers;
    turned off again (and the hook removed) on the way out, so the caller's model is as it was.
    """
    if not enabled:
        yield
        return
    inner = next((module for module in model.modules() if isinstance(module, PreTrainedModel)), None)
    if inner is None or not inner.supports_gradient_checkpointing:
        raise ValueError(f"optim.activation_checkpointing: {type(inner or model).__name__} does not support activation "
                         "checkpointing (transformers' supports_gradient_checkpointing); set it to false")
    already = inner.is_activation_checkpointing
    if not already:
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        if not already:
            inner.activation_checkpointing_disable()
            inner.disable_input_require_grads()


@dataclass
class TrainingRun:
    """What the loop's steps share: the model (and its DDP wrapper), optimizer, scheduler, data and where the run is."""

    model: torch.nn.Module
    trained: torch.nn.Module  # the model, or its DDP wrapper, compiled under optim.compile: what the forward pass calls
    examples: Sequence[dict]
    cfg: object  # an OptimConfig
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    plugins: Sequence[CLPlugin]
    seed: int
    pad_token_id: int
    shuffle: bool
    desc: str
    rank: int
    world: int
    fsdp: bool
    autocast: contextlib.AbstractContextManager
    want_attentions: bool  # a CL plugin reads the attention maps
    start_step: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0  # this rank's, counted on the CPU copies of its batches

    @property
    def per_rank(self) -> int:
        return self.cfg.batch_size // self.world


def setup(model, examples, cfg, *, seed, pad_token_id, device, plugins, resume_from, desc, shuffle, strategy, precision) -> TrainingRun:
    """Check the data, place (or shard) the model, build optimizer and scheduler, resume, wrap in DDP."""
    if not examples:
        raise ValueError(f"{desc}: no training examples; the stage would silently learn nothing")
    positions, longest = max_positions(model), max(len(example["input_ids"]) for example in examples)
    if positions is not None and longest > positions:
        # A learned position table (GPT-2's) would fail mid-step with a bare IndexError.
        raise ValueError(f"{desc}: an example has {longest} tokens, more than the {positions} positions of "
                         f"{type(model).__name__}; set optim.max_length to at most {positions}")
    device = device or next(model.parameters()).device
    rank, world = _distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world}")
    fsdp = world > 1 and strategy == "fsdp"
    if fsdp and not is_sharded(model):  # a stage shards it itself, before the CL plugins' first hook
        # Before the optimizer (it must hold the shards) and before moving: a model loaded on the
        # CPU then reaches the device one block at a time (moved, then sharded), never whole.
        shard_model(model, device)
    if fsdp:
        # The optimizer must hold the shards: a forward without backward (a CL plugin's hook) leaves FSDP2's
        # root unit gathered, its modules holding the gathered copies.
        reshard(model)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))
    start_step, losses = 0, []
    if resume_from is not None:
        start_step, losses = load_state(resume_from, model, optimizer, scheduler, plugins)
    trained = model
    if world > 1 and not fsdp:
        # DDP averages the ranks' gradients during backward; CPU (gloo) modules take no device_ids.
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        # Only the loop's forward (and so its backward) is compiled: `model` stays eager for the CL plugins' passes and
        # for whatever evaluates it after training, whose shapes would each compile again.
        _check_compiler(device)
        trained = torch.compile(trained)
    return TrainingRun(model=model, trained=trained, examples=examples, cfg=cfg, optimizer=optimizer, scheduler=scheduler,
                       device=device, plugins=plugins, seed=seed, pad_token_id=pad_token_id, shuffle=shuffle, desc=desc,
                       rank=rank, world=world, fsdp=fsdp, autocast=precision_context(precision, device),
                       want_attentions=any(plugin.needs_attentions for plugin in plugins),
                       start_step=start_step, losses=losses)


def _check_compiler(device: torch.device) -> None:
    """optim.compile on the CPU: TorchInductor builds its kernels with a C++ compiler; refuse before any step."""
    if device.type == "cpu" and not any(shutil.which(name) for name in ("c++", "g++", "clang++")):
        raise ValueError("optim.compile: TorchInductor needs a C++ compiler (c++, g++ or clang++) on the PATH to build "
                         "its CPU kernels, and none was found; install one (e.g. apt-get install g++) or set "
                         "optim.compile=false")


def train_step(run: TrainingRun, step: int) -> float:
    """One optimizer step over ``cfg.grad_accum`` micro-batches; returns its (global) loss.

    Raises NonFiniteLossError before the update when the loss or the gradient norm is nan or inf."""
    cfg, model = run.cfg, run.model
    run.optimizer.zero_grad(set_to_none=True)
    # Summed on the device and read once per step: a .item() per micro-batch would stall a GPU.
    # float64 keeps the sum as exact as the Python-float sum it replaces.
    step_loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    for accum in range(cfg.grad_accum):
        loss = _micro_step(run, step * cfg.grad_accum + accum, last=accum == cfg.grad_accum - 1)
        step_loss_sum += loss.detach().double() / cfg.grad_accum
    if run.world > 1:
        # The mean of the ranks' losses: what the global batch's gradient followed (DDP averages
        # gradients the same way), identical on every rank so logs and checkpoints agree.
        dist.all_reduce(step_loss_sum)
        step_loss_sum /= run.world
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    # FSDP: a DTensor; its full value is the whole model's norm, the same on every rank.
    grad_norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    # Read before the optimizer step (one device sync for both): a nan/inf step must not reach
    # the weights. Loss and norm are global, so every rank stops at the same step.
    step_loss, step_norm = torch.stack([step_loss_sum, grad_norm.double()]).tolist()
    if not (math.isfinite(step_loss) and math.isfinite(step_norm)):
        raise NonFiniteLossError(
            f"{run.desc}: non-finite training loss {step_loss} (gradient norm {step_norm}) at step {step + 1} of "
            f"{cfg.max_steps}; stopped before that step's update (the weights are those after step {step}; step 0: "
            "the input model's) and saved no checkpoint or model for this step or later. A rerun resumes from the "
            "last committed checkpoint and would meet the same step: fix the cause first (a lower optim.lr, the "
            "data of this step, or nan/inf weights in the input model)"
        )
    if step_norm + 1e-6 >= cfg.grad_clip * (1 - 1e-5):
        # clip_grad_norm_'s scaling, by min(1, grad_clip / (norm + 1e-6)). Below this bound that factor is exactly 1
        # even after float32 rounding, so skipping the multiply changes no bit and saves a pass over every gradient
        # (30 ms a step of SmolLM2's full fine-tuning on 2 CPU cores).
        torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, norm)
    run.optimizer.step()
    run.scheduler.step()
    return step_loss


def _micro_step(run: TrainingRun, micro_index: int, last: bool) -> torch.Tensor:
    """Forward and backward of this rank's slice of one micro-batch; returns its loss (CL plugins' terms included)."""
    per_rank = run.per_rank
    positions = stream_indices(len(run.examples), run.seed, micro_index * run.cfg.batch_size + run.rank * per_rank, per_rank,
                               run.shuffle)
    cpu_batch = collate([run.examples[i] for i in positions], run.pad_token_id)
    run.tokens += int(cpu_batch["attention_mask"].sum())  # counted on the CPU copy: no device sync
    batch = {k: v.to(run.device) for k, v in cpu_batch.items()}
    # Gradients are reduced across ranks only on the step's last micro-batch.
    sync = contextlib.nullcontext()
    if run.fsdp:
        run.model.set_requires_gradient_sync(last)
    elif run.world > 1 and not last:
        sync = run.trained.no_sync()
    with sync:
        with run.autocast:
            # No KV cache: training never reads one, and building it copies every layer's keys and values.
            attentions = {"output_attentions": True} if run.want_attentions else {}
            outputs = run.trained(**batch, use_cache=False, **attentions)
            loss = outputs.loss
            for plugin in run.plugins:
                extra = plugin.extra_loss(run.model, batch, outputs)
                if extra is not None:
                    loss = loss + extra
        # Without this the logits (batch x length x vocab: 151 MB in fp32 for SmolLM2 at 8 x 96)
        # outlive backward and the optimizer step, and each step allocates them afresh.
        del outputs
        (loss / run.cfg.grad_accum).backward()
    return loss


def checkpoint(run: TrainingRun, done: int, checkpoint_dir: Path, checkpoint_fn: CheckpointFn) -> None:
    """Save the state after step ``done`` and hand it to ``checkpoint_fn`` (rank 0; under FSDP every rank gathers)."""
    state_dir = checkpoint_dir / f"step-{done:08d}"
    if run.rank == 0 or run.fsdp:  # FSDP: every rank takes part in gathering the tensors
        save_state(state_dir, run.model, run.optimizer, run.scheduler, done, run.losses, run.plugins)
    if run.rank == 0:
        checkpoint_fn(done, state_dir)


def global_tokens(run: TrainingRun) -> int:
    """Tokens trained by the whole job, not by one rank."""
    if run.world == 1:
        return run.tokens
    total = torch.tensor([run.tokens], dtype=torch.int64, device=run.device)
    dist.all_reduce(total)
    return int(total.item())
