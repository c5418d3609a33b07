"""A stage on two "nodes": two torchrun agents on this machine, started by a stand-in for srun
(tests/node_launcher.py), meeting at a local c10d endpoint on a free port, one gloo rank each,
against the real SeaweedFS and MLflow. The stage commits what one process commits (within the
tolerance of tests/test_distributed.py: the same global batch, summed in another order), and
losing a node mid-stage fails the stage with the surviving rank's error and commits nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from perennial.config import Config, ConfigError, build_config
from tasks.launch import StageLaunchError, run_stage, torchrun_command
from tasks.stage import latest_checkpoint
from tests.test_launch import OPTIM, assert_same_training, spec, stage_inputs  # noqa: F401 (a fixture)


LAUNCHER = Path(__file__).with_name("node_launcher.py")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_nodes(services, name: str, base_uri: str, task, pids: Path, **fields):
    """The spec as `stage_spec` makes it from distributed.nnodes=2, nproc_per_node=1, a c10d endpoint and a launcher."""
    return spec(services, name, base_uri, task, processes=1, nodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}",
                launcher=[sys.executable, str(LAUNCHER), "2", str(pids), "--"], **fields)


def test_several_nodes_are_refused_at_config_load_without_an_endpoint_or_a_launcher():
    base = Config().model_dump(mode="json")
    nodes = ["distributed.nnodes=2"]
    endpoint, launcher = "distributed.rdzv_endpoint=node-0:29400", "distributed.launcher=[srun, --ntasks-per-node=1]"
    refusals = {
        (): "distributed.rdzv_endpoint is required when distributed.nnodes=2",
        (endpoint,): "distributed.launcher is required when distributed.nnodes=2",
        ("distributed.rdzv_endpoint=node-0", launcher): "'node-0' is not host:port",
        ("distributed.rdzv_endpoint=node-0:70000", launcher): "'node-0:70000': port 70000 is out of range (1-65535",
        ("distributed.nnodes=3", endpoint, launcher):
            "dap.optim.batch_size 16 must be divisible by the 3 processes of distributed.nnodes 3 x distributed.nproc_per_node 1",
    }
    for extra, message in refusals.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            build_config(base, [*nodes, *extra])
    with pytest.raises(ConfigError, match="rdzv_endpoint is required .*; and distributed.launcher is required"):
        build_config(base, nodes)  # both missing: both named at once
    cfg = build_config(base, [*nodes, endpoint, launcher])
    assert (cfg.distributed.nnodes, cfg.distributed.rdzv_endpoint, cfg.distributed.launcher) == (2, "node-0:29400", ["srun", "--ntasks-per-node=1"])
    ipv6 = {**base, "distributed": {**base["distributed"], "rdzv_endpoint": "[fd00::5]:29400"}}
    assert build_config(ipv6).distributed.nnodes == 1  # accepted, and unused on one node
    # Where the nodes meet and how they are started is not what the run computes: a retry in another
    # allocation (another first node) resumes the same run key; the number of nodes is.
    moved = build_config(base, [*nodes, "distributed.rdzv_endpoint=node-7:29500", "distributed.launcher=[srun]"])
    assert moved.outputs_digest() == cfg.outputs_digest() != build_config(base).outputs_digest()


def test_the_command_runs_one_agent_per_node_at_the_rendezvous(tmp_path):
    from tasks.stage import StageData, StageSpec

    one = StageSpec(name="s", stage_root="r", work_dir=tmp_path, input_model_uri="u", data=StageData(encoding="packed"),
                    optim=OPTIM, tuning={"method": "full"}, seed=0, config_digest="d", processes=4)
    assert torchrun_command(one, tmp_path / "spec.json")[1:6] == ["-m", "torch.distributed.run", "--standalone",
                                                                   "--nproc_per_node=4", "-m"]
    several = one.model_copy(update={"nodes": 3, "rdzv_endpoint": "node-0:29400", "launcher": ["srun", "--ntasks-per-node=1"]})
    first, second = (torchrun_command(several, tmp_path / "spec.json") for _ in range(2))
    assert first[:3] == ["srun", "--ntasks-per-node=1", sys.executable]
    assert first[3:9] == ["-m", "torch.distributed.run", "--nnodes=3", "--nproc_per_node=4", "--rdzv_backend=c10d",
                          "--rdzv_endpoint=node-0:29400"]
    assert first[9].startswith("--rdzv_id=s-") and first[9] != second[9]  # a retry never joins a failed attempt's rendezvous
    assert first[10:] == ["-m", "tasks.launch", str(tmp_path / "spec.json")]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.usefixtures("single_torch_thread")
def test_two_nodes_commit_what_one_process_commits(stage_inputs, tmp_path, capfd):
    ctx, base_uri, (task, _), _ = stage_inputs
    launched = two_nodes(ctx, "two-nodes", base_uri, task, tmp_path / "pids.json")
    launched_uri = run_stage(launched, ctx)
    streamed = capfd.readouterr().out
    # One rank on each node: node ranks 0 and 1 were handed out at the rendezvous.
    assert "two-nodes: rank 0/2, ddp on cpu, node " in streamed and "two-nodes: rank 1/2, ddp on cpu, node " in streamed
    assert ", node 0/2 (" in streamed and ", node 1/2 (" in streamed
    assert launched_uri == ctx.store.uri(launched.output_prefix)
    single_uri = run_stage(spec(ctx, "one-process", base_uri, task), ctx)
    assert_same_training(ctx, launched_uri, single_uri)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.usefixtures("single_torch_thread")
def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), whatever session or process group it is in."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        children = parents.get(queue.pop(), [])
        found += children
        queue += children
    return found


def test_losing_a_node_mid_stage_fails_the_stage_and_commits_nothing(stage_inputs, tmp_path):
    ctx, base_uri, (task, _), _ = stage_inputs
    pids = tmp_path / "pids.json"
    launched = two_nodes(ctx, "node-lost", base_uri, task, pids, optim=OPTIM.model_copy(update={"max_steps": 1000}))
    outcome: dict = {}

    def launch():
        try:
            outcome["uri"] = run_stage(launched, ctx)
        except BaseException as error:  # noqa: BLE001 - the test reads it
            outcome["error"] = error

    thread = threading.Thread(target=launch)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        # The first committed checkpoint: both nodes have met and trained two steps.
        while latest_checkpoint(ctx.store, launched.checkpoints_prefix) is None:
            assert thread.is_alive() and time.monotonic() < deadline, f"no checkpoint: {outcome}"
            time.sleep(0.3)
        lost = json.loads(pids.read_text())[1]
        killed_at = time.monotonic()
        # The node's torchrun agent and its rank at once, as when the machine goes. torchrun starts each rank in a
        # session of its own, so the rank is not in the agent's process group: kill every process of the node's tree.
        for pid in [lost, *_descendants(lost)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        thread.join(timeout=90)
        assert not thread.is_alive(), "the surviving node did not notice"
    finally:  # never leave a node training behind a failed assertion
        for pid in json.loads(pids.read_text()) if pids.exists() else []:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    noticed = time.monotonic() - killed_at
    error = outcome.get("error")
    assert isinstance(error, StageLaunchError), outcome
    headline = str(error).partition("\n")[0]
    assert headline.startswith("node-lost: training under torchrun (2 nodes x 1 processes, ddp) failed with exit code "), headline
    # The surviving node's own error: its rank's ("[rank0]: ... Connection reset"), or, when its torchrun agent's
    # rendezvous heartbeat notices the lost peer first and stops the rank before it prints (seen under CPU load), the
    # agent's connection error; never the bare "no exception in the output".
    assert any(sign in headline for sign in ("[rank", "DistNetworkError", "RendezvousConnectionError")), headline
    assert ctx.store.read_manifest(launched.output_prefix) is None
    print(f"the stage failed {noticed:.1f} s after the node was killed: {headline}")
