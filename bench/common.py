"""What every benchmark script reports the same way: the machine, the load, the command, the files."""

from __future__ import annotations

import json
import os
import platform
import shlex
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


def machine(packages: tuple[str, ...] = ("torch", "transformers")) -> dict:
    """CPU, cores, memory, Python and the versions of the packages whose speed is measured."""
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    from models.engine import cpu_has_native_bf16

    return {
        "cpu_model": cpu, "logical_cores": os.cpu_count(), "memory_gib": memory_gib,
        # "AMD EPYC" names CPUs with and without AVX512-BF16, and bf16 autocast is ~3x fp32 only with it
        "native_bf16": cpu_has_native_bf16(),
        "torch_threads": torch.get_num_threads(), **versions, "python": platform.python_version(),
        "platform": platform.platform(),
    }


def command(module: str, argv: list[str]) -> str:
    return shlex.join(["python", "-m", module, *argv])


def load_note(before: float, after: float, cores: int | None = None) -> str:
    """One sentence for a report: was the machine shared while the numbers were taken?"""
    cores = cores or os.cpu_count() or 1
    busy = max(before, after) > 0.5 * cores
    state = "under load from other processes" if busy else "on a mostly idle machine"
    return f"Measured {state} (1-minute load average {before:.1f} before, {after:.1f} after, {cores} logical cores)."


def machine_line(info: dict) -> str:
    versions = ", ".join(f"{name} {info[name]}" for name in info if name not in _MACHINE_KEYS and info[name])
    memory = f", {info['memory_gib']} GiB RAM" if info.get("memory_gib") else ""
    bf16 = {True: ", native bf16", False: ", no native bf16"}.get(info.get("native_bf16"), "")  # older results lack the key
    threads = f"; torch threads {info['torch_threads']}" if "torch_threads" in info else ""
    return (f"{info['cpu_model']}, {info['logical_cores']} logical cores{memory}{bf16}; {info['platform']}; "
            f"Python {info['python']}, {versions}{threads}.")


_MACHINE_KEYS = {"cpu_model", "logical_cores", "memory_gib", "native_bf16", "torch_threads", "python", "platform"}


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; floats keep the precision the caller formatted them with."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, report: dict, markdown: str, directory: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """`<name>.json` (every number) and `<name>.md` (the section BENCHMARKS.md is assembled from)."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / f"{name}.json", directory / f"{name}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path
