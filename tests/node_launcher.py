"""Stands in for `srun --ntasks-per-node=1` on one machine in tests/test_multinode.py.

    python tests/node_launcher.py N PIDS_FILE -- COMMAND...

runs COMMAND N times at once, as N "nodes", each in its own process group (a test kills a whole
node, agent and ranks, with one killpg), writes their pids to PIDS_FILE, passes their output on
line by line, and once all have ended exits with the first non-zero status among them (128 + the
signal's number for a killed one), as srun does without --kill-on-bad-exit: a surviving node must
notice the loss by itself. SIGTERM (a cancelled stage) is passed on to every node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path


def main(argv: list[str]) -> int:
    count, pids_file, command = int(argv[0]), Path(argv[1]), argv[argv.index("--") + 1:]
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                              start_new_session=True) for _ in range(count)]
    pids_file.write_text(json.dumps([node.pid for node in nodes]))

    def stop(signum, frame):
        for node in nodes:
            try:
                os.killpg(node.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    lock = threading.Lock()

    def relay(node: subprocess.Popen) -> None:
        for line in node.stdout:
            with lock:
                sys.stdout.write(line)
                sys.stdout.flush()

    relays = [threading.Thread(target=relay, args=(node,)) for node in nodes]
    for thread in relays:
        thread.start()
    codes = [node.wait() for node in nodes]
    for thread in relays:
        thread.join()
    for index, code in enumerate(codes):
        if code:
            print(f"node_launcher: node {index} (pid {nodes[index].pid}) exited with status {code}", flush=True)
    failed = [128 - code if code < 0 else code for code in codes if code]
    return failed[0] if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
