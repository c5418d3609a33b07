"""Two CPU ranks on gloo for the distributed tests (tests/test_distributed.py, tests/test_cl_fsdp.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORLD = 2


class gloo_ranks:
    """WORLD plain processes running ``script out_dir`` with torchrun's RANK / WORLD_SIZE variables, one torch
    thread each; the process group meets through a file under out_dir, so there is no port to pick or collide on.
    (torchrun's agent would add one more interpreter start, seconds on a busy machine, and test nothing of the
    engine.) The caller trains its single-process reference while they run, then ``wait``s, which fails the test
    with a rank's log if any rank failed; leaving the block kills any rank still running, so none is left waiting
    on its peer."""

    def __init__(self, script: str, out_dir: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
               "WORLD_SIZE": str(WORLD)}
        self.processes = [
            subprocess.Popen([sys.executable, script, str(out_dir)], env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for rank in range(WORLD)
        ]

    def __enter__(self) -> "gloo_ranks":
        return self

    def wait(self, timeout: float) -> None:
        logs = [process.communicate(timeout=timeout)[0] for process in self.processes]
        for rank, (process, log) in enumerate(zip(self.processes, logs)):
            assert process.returncode == 0, f"rank {rank} failed:\n{log[-6000:]}"

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            process.kill()  # no-op once exited
