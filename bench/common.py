"""What every benchmark script reports the same way: the machine, the load, the command, the section's head, the files."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from perennial.compare import machine_line, table  # noqa: F401 - what every benchmark reports, as `perennial compare` does
from tasks.compare import load_note, machine  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).parent / "results"


def command(module: str, argv: list[str]) -> str:
    return shlex.join(["python", "-m", module, *argv])


def report_head(module: str, argv: list[str], load_before: float, packages: tuple[str, ...] = ("torch", "transformers")) -> dict:
    """The keys every report opens with; the load average after is read now."""
    return {"command": command(module, argv), "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(packages), "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]}}


def section_head(title: str, report: dict, measured: str = "") -> list[str]:
    """`## title`, the command, the machine and the load (the last line, for a script to add to)."""
    load = report["load_average_1min"]
    return [f"## {title}", "", f"Command: `{report['command']}` (measured {report['measured_at']}{measured}).", "",
            f"Machine: {machine_line(report['machine'])}", load_note(load["before"], load["after"], report["machine"]["logical_cores"])]


def child(module: str, job: dict, cwd: Path = ROOT) -> dict:
    """`python -m module --child JOB` in a fresh process (its allocator, peak RSS and CPU time its own); the JSON line
    it printed last."""
    done = subprocess.run([sys.executable, "-m", module, "--child", json.dumps(job)], capture_output=True, text=True, cwd=cwd)
    if done.returncode:
        raise RuntimeError(f"{module} {json.dumps(job)[:200]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_results(name: str, report: dict, markdown: str, directory: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """`<name>.json` (every number) and `<name>.md` (the section BENCHMARKS.md is assembled from); says where."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / f"{name}.json", directory / f"{name}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    print(f"wrote {json_path} and {md_path}", flush=True)
    return json_path, md_path
