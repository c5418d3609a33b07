"""A training stage on several processes (GPUs): torchrun started as a subprocess of the task.

The task itself never becomes a rank: its Prefect context, API client and retries would be
copied into every process. `launch_stage` (the task's side, called by `run_stage` when
`distributed.nproc_per_node` > 1) prepares everything as files, starts

    python -m torch.distributed.run --standalone --nproc_per_node N -m tasks.launch SPEC.json

streams the ranks' output, and commits the model rank 0 exported, exactly like an in-process
stage. Each rank runs `worker` (this module as a script): load the input model from the local
cache, tune, train with the engine under DDP or FSDP (`distributed.strategy`), commit mid-stage
checkpoints (rank 0), export. A failed launch commits nothing and raises; a retry resumes from
the newest committed mid-stage checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from models.cl.base import CLPlugin
from models.engine import TrainResult, full_state_dict, is_sharded, resolve_device, set_seed, train
from models.loading import load_causal_lm, load_model_and_tokenizer, load_tokenizer, save_model
from models.tuning import apply_tuning, merge_for_export
from perennial.config import OptimConfig, TuningConfig
from tasks.runtime import RunContext, fetch_dir, open_store, open_tracker
from tasks.training import checkpoint_committer, commit_output, download_resume

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT_TAIL_LINES = 60
# A rank's uncaught exception, e.g. "[rank1]: IndexError: index out of range in self"; torchrun's
# own ChildFailedError only says that a rank failed.
_ERROR_LINE = re.compile(r"^(\[rank\d+\]:\s*)?(?!torch\.distributed\.elastic)[A-Za-z_][\w.]*(Error|Exception)(:.*)?$")


class StageLaunchError(RuntimeError):
    """The stage's torchrun failed; the message carries the ranks' last output lines."""


@dataclasses.dataclass(frozen=True)
class StagePaths:
    """Where a launched stage's files live, the same on the task's side and the ranks' side."""

    root: Path

    @property
    def spec(self) -> Path:
        return self.root / "launch" / "spec.json"

    @property
    def examples(self) -> Path:
        return self.root / "launch" / "examples.jsonl"

    @property
    def result(self) -> Path:
        return self.root / "launch" / "result.json"

    @property
    def resume(self) -> Path:
        return self.root / "resume"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def export(self) -> Path:
        return self.root / "model"


def launch_stage(
    run: RunContext,
    stage: str,
    input_model_uri: str,
    examples: list[dict] | Callable[[object], list[dict]],
    optim: OptimConfig,
    tuning: TuningConfig,
    *,
    plugins: Sequence[CLPlugin] = (),
    plugin_state_uri: str | None = None,
    task_index: int = 0,
    replay_examples: list[dict] | None = None,
    mlflow_run_id: str | None = None,
    shuffle: bool = True,
    stage_root: str | None = None,
) -> str:
    """Train one stage under torchrun; returns the committed output model's URI (run_stage's contract)."""
    cfg = run.config
    processes = cfg.distributed.nproc_per_node
    if plugins or plugin_state_uri or replay_examples:
        raise ValueError(f"{stage}: CL plugins do not run in multi-process stages yet; use distributed.nproc_per_node=1")
    if optim.batch_size % processes:
        raise ValueError(f"{stage}: batch_size {optim.batch_size} must be divisible by distributed.nproc_per_node {processes}")
    store = open_store(cfg)
    stage_root = stage_root or run.stage_prefix(stage)
    paths = StagePaths(run.work_dir / stage)
    # Nothing from an earlier, failed attempt may pass for this one's output.
    for stale in (paths.spec.parent, paths.export, paths.checkpoints):
        shutil.rmtree(stale, ignore_errors=True)
    paths.spec.parent.mkdir(parents=True)

    # One download into the shared cache; every rank then reads the same local folder.
    model_dir = fetch_dir(store, input_model_uri, Path(cfg.work_dir) / "cache")
    if callable(examples):
        examples = examples(load_tokenizer(model_dir))
    with open(paths.examples, "w") as handle:
        for example in examples:
            handle.write(json.dumps(example) + "\n")
    resume_dir = download_resume(store, f"{stage_root}/checkpoints", paths.resume)
    paths.spec.write_text(json.dumps({
        "run": run.model_dump(mode="json"),
        "stage": stage,
        "stage_root": stage_root,
        "model_dir": str(model_dir),
        "optim": optim.model_dump(mode="json"),
        "tuning": tuning.model_dump(mode="json"),
        "task_index": task_index,
        "mlflow_run_id": mlflow_run_id,
        "shuffle": shuffle,
        "resume_dir": str(resume_dir) if resume_dir else None,
    }))

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "tasks.launch", str(paths.spec)]
    returncode, first_error, tail = _run_streaming(command, _worker_env())
    if returncode != 0:
        raise StageLaunchError(
            f"{stage}: training under torchrun ({processes} processes, {cfg.distributed.strategy}) failed with exit code "
            f"{returncode}: {first_error or 'no exception in the output (killed?)'}\n"
            "Nothing was committed; a retry resumes from the newest committed checkpoint. Last output:\n" + "".join(tail)
        )
    if not paths.result.is_file() or not paths.export.is_dir():
        raise StageLaunchError(f"{stage}: torchrun exited 0 but rank 0 exported no model to {paths.export}")
    result = TrainResult(**json.loads(paths.result.read_text()))
    return commit_output(run, stage, paths.export, f"{stage_root}/model", result, mlflow_run_id)


def _worker_env() -> dict[str, str]:
    """The ranks import this checkout (not another installed copy) and, on CPUs, share the cores."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run_streaming(command: list[str], env: dict[str, str]) -> tuple[int, str | None, list[str]]:
    """Run, passing every output line on as it comes (the task's log shows progress); returns the
    exit code, the first exception line (the root cause; the other ranks' errors tend to follow
    from it) and the last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
    first_error = None
    # Its own process group: on an interruption the ranks (torchrun's children) are stopped with it.
    # The same working directory: the ranks find the stage's files through the same (maybe relative) work_dir.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1, start_new_session=True)
    try:
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)
            if first_error is None and _ERROR_LINE.match(line):
                first_error = line.strip()
        return process.wait(), first_error, list(tail)
    except BaseException:  # interrupted or cancelled: no rank may keep training (and committing) behind it
        _stop_group(process)
        raise


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM lets torchrun stop its ranks itself; SIGKILL if that takes longer than 30 s."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue


# --- one rank -----------------------------------------------------------------------------------


def worker(spec_path: Path) -> None:
    """What each torchrun process runs: the in-process stage's training, on its share of every batch."""
    spec = json.loads(Path(spec_path).read_text())
    run = RunContext.model_validate(spec["run"])
    cfg, stage = run.config, spec["stage"]
    paths = StagePaths(run.work_dir / stage)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # "cuda" alone would put every rank on GPU 0
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    print(f"{stage}: rank {rank}/{dist.get_world_size()}, {cfg.distributed.strategy} on {device}", flush=True)
    try:
        optim, tuning = OptimConfig(**spec["optim"]), TuningConfig(**spec["tuning"])
        set_seed(cfg.seed + spec["task_index"])  # as in run_stage: every rank draws the same adapters
        # FSDP: loaded on the CPU; the engine shards it, so it reaches the device one block at a time.
        load_to = "cpu" if cfg.distributed.strategy == "fsdp" else device
        model, tokenizer = load_model_and_tokenizer(spec["model_dir"], attn_implementation=cfg.model.attn_implementation, device=load_to)
        model = apply_tuning(model, tuning)
        examples = [json.loads(line) for line in paths.examples.read_text().splitlines()]
        # FSDP gathers on every rank when a checkpoint is due, so every rank passes checkpoint_fn;
        # the engine calls it (the upload) on rank 0 only.
        commit = checkpoint_committer(open_store(cfg), f"{spec['stage_root']}/checkpoints", stage)
        log = None
        if rank == 0 and spec["mlflow_run_id"]:
            tracker = open_tracker(cfg, spool_dir=paths.root)
            log = lambda metrics, step: tracker.log_metrics(  # noqa: E731
                spec["mlflow_run_id"], {f"train/{k}": v for k, v in metrics.items()}, step)
        result = train(
            model, examples, optim, seed=cfg.seed, pad_token_id=tokenizer.pad_token_id, device=device,
            resume_from=Path(spec["resume_dir"]) if spec["resume_dir"] else None, checkpoint_fn=commit,
            checkpoint_dir=paths.checkpoints, log_fn=log, desc=stage, shuffle=spec["shuffle"],
            strategy=cfg.distributed.strategy, precision=cfg.precision,
        )
        state = full_state_dict(model) if is_sharded(model) else None  # a collective: before the rank-0 branch
        if rank == 0:
            if state is not None:
                # A sharded module cannot be saved as one model; a plain copy of the same tuning can.
                model = apply_tuning(load_causal_lm(spec["model_dir"], attn_implementation=cfg.model.attn_implementation), tuning)
                model.load_state_dict(state)
            save_model(merge_for_export(model), tokenizer, paths.export)
            if log is not None:
                tracker.flush(raise_on_error=False)  # the rest stays in the spool the task's side sends
            paths.result.write_text(json.dumps(
                {"steps": result.steps, "losses": result.losses, "tokens": result.tokens, "seconds": result.seconds,
                 "resumed_from": result.resumed_from}))
        dist.barrier()  # no rank exits (and ends the job) before the export is written
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
