"""Where a stage runs: in this process, or under torchrun when the spec asks for several processes.

`run_stage(spec, services)` returns a committed stage's output at once; otherwise it runs
`execute_stage` here (world size 1), or writes the spec as spec.json and starts

    python -m torch.distributed.run --standalone --nproc_per_node N -m tasks.launch SPEC.json

or, on several machines (``spec.nodes`` > 1), the spec's ``launcher`` (e.g. srun) with

    python -m torch.distributed.run --nnodes M --nproc_per_node N --rdzv_backend c10d --rdzv_endpoint HOST:PORT
        --rdzv_id ID -m tasks.launch SPEC.json

which it runs once on every node; the M agents meet at the endpoint, where node ranks are handed
out. Every rank runs `execute_stage` on the same spec (rank 0 commits). The task itself never
becomes a rank: its Prefect context, API client and retries would be copied into every process.
A failed launch commits nothing and raises the first rank's error; a retry resumes from the
newest committed mid-stage checkpoint.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from models.engine import resolve_device
from perennial.config import Config
from tasks.runtime import Services
from tasks.stage import StageSpec, execute_stage, finished_stage

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT_TAIL_LINES = 60
# A rank's uncaught exception, e.g. "[rank1]: IndexError: index out of range in self"; torchrun's
# own ChildFailedError only says that a rank failed.
_ERROR_LINE = re.compile(r"^(\[rank\d+\]:\s*)?(?!torch\.distributed\.elastic)[A-Za-z_][\w.]*(Error|Exception)(:.*)?$")


class StageLaunchError(RuntimeError):
    """The stage's torchrun failed; the message carries the ranks' last output lines."""


def run_stage(spec: StageSpec, services: Services) -> str:
    """Train the stage (unless already committed); returns the committed output model's URI."""
    done = finished_stage(spec, services)
    if done:
        return done
    if spec.processes == 1 and spec.nodes == 1:
        return execute_stage(spec, services)
    return launch(spec, services)


def launch(spec: StageSpec, services: Services) -> str:
    """Run `execute_stage` on ``spec.processes`` torchrun ranks per node on ``spec.nodes`` nodes; returns the URI
    rank 0 committed.

    Raises StageLaunchError with the first rank's exception line and the last output lines.
    """
    spec_file = spec.work_dir / "launch" / "spec.json"
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(spec.model_dump_json())
    # The ranks open their own services from the same config (written next to the spec).
    (spec_file.parent / "config.json").write_text(services.config.model_dump_json())
    returncode, first_error, tail = _run_streaming(torchrun_command(spec, spec_file), _worker_env())
    if returncode != 0:
        where = f"{spec.processes} processes" if spec.nodes == 1 else f"{spec.nodes} nodes x {spec.processes} processes"
        # A rank whose peer vanished reports a connection error; the cause is on the node that went first.
        peers = ("" if spec.nodes == 1 else " (a connection error here usually means another node's agent or ranks "
                 "ended first: see the launcher's lines below and that node's log)")
        raise StageLaunchError(
            f"{spec.name}: training under torchrun ({where}, {spec.strategy}) failed with exit code "
            f"{returncode}: {first_error or 'no exception in the output (killed?)'}\n"
            f"Nothing was committed; a retry resumes from the newest committed checkpoint{peers}. Last output:\n" + "".join(tail)
        )
    done = finished_stage(spec, services)
    if done is None:
        raise StageLaunchError(f"{spec.name}: torchrun exited 0 but rank 0 committed no model under {spec.output_prefix}")
    return done


def torchrun_command(spec: StageSpec, spec_file: Path) -> list[str]:
    """The command that starts the stage's ranks: one torchrun on this machine, or ``spec.launcher`` running the
    same torchrun on each of ``spec.nodes`` nodes.

    Several nodes meet by c10d rendezvous at ``spec.rdzv_endpoint``: the agent on that host serves the store and the
    others connect to it, and node ranks are handed out in the order the agents join, so every node runs the
    identical command (no node rank to pass per node). The rendezvous id is new on every launch, so a retry never
    joins what is left of a failed attempt. The spec file's path must name the same file on every node.
    """
    if spec.nodes == 1:
        topology = ["--standalone", f"--nproc_per_node={spec.processes}"]
    else:
        topology = [f"--nnodes={spec.nodes}", f"--nproc_per_node={spec.processes}", "--rdzv_backend=c10d",
                    f"--rdzv_endpoint={spec.rdzv_endpoint}", f"--rdzv_id={spec.name}-{uuid.uuid4().hex[:12]}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", *topology, "-m", "tasks.launch", str(spec_file)]
    return [*spec.launcher, *torchrun] if spec.nodes > 1 else torchrun


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


def worker(spec_file: Path) -> None:
    """What each torchrun process runs: `execute_stage` on its share of every batch."""
    if not Path(spec_file).exists():
        raise FileNotFoundError(
            f"{spec_file} is not on this node ({socket.gethostname()}, working directory {os.getcwd()}): with "
            "distributed.nnodes > 1, work_dir must be on a filesystem every node mounts at the same path, and every node "
            "must start in the same working directory (rank 0 downloads the stage's inputs there for all ranks)"
        )
    spec = StageSpec.model_validate_json(Path(spec_file).read_text())
    config = Config.model_validate_json((Path(spec_file).parent / "config.json").read_text())
    device = resolve_device(spec.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # "cuda" alone would put every rank on GPU 0
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    node = f", node {os.environ.get('GROUP_RANK')}/{spec.nodes} ({socket.gethostname()})" if spec.nodes > 1 else ""
    print(f"{spec.name}: rank {dist.get_rank()}/{dist.get_world_size()}, {spec.strategy} on {device}{node}", flush=True)
    try:
        execute_stage(spec, Services.open(config))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
