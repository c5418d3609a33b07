"""What every benchmark script reports the same way: the machine, the load, the command, the files."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from perennial.compare import machine_line, table  # noqa: F401 - what every benchmark reports, as `perennial compare` does
from tasks.compare import load_note, machine  # noqa: F401

RESULTS_DIR = Path(__file__).parent / "results"


def command(module: str, argv: list[str]) -> str:
    return shlex.join(["python", "-m", module, *argv])


def write_results(name: str, report: dict, markdown: str, directory: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """`<name>.json` (every number) and `<name>.md` (the section BENCHMARKS.md is assembled from)."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / f"{name}.json", directory / f"{name}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path
