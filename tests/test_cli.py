import subprocess
import sys

import pytest

from app.cli import main


def test_help_explains_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    for word in ("run", "services", "DAP", "registry"):
        assert word in out


def test_bad_override_fails_before_any_work(capsys):
    assert main(["run", "configs/demo.yaml", "cit.optim.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert "cit.optim.lr" in err and "greater than 0" in err


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "app.cli", "services", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "up" in result.stdout


def test_a_second_services_folder_moves_seaweedfs_internal_ports_another_instance_holds(tmp_path, monkeypatch):
    """`perennial services up --root OTHER --s3-port P --mlflow-port Q` beside a running instance: SeaweedFS's
    internal ports (master, volume, filer...) were fixed from 19330, so its second `weed mini` failed to start.
    Unchosen (no PERENNIAL_WEED_PORT_BASE, no saved state), they move to a free range; chosen, they stay."""
    import socket

    from app.services import _WEED_PORT_FLAGS, HOST, LocalServices, _free_port_range

    monkeypatch.delenv("PERENNIAL_WEED_PORT_BASE", raising=False)
    fresh = LocalServices.from_env(tmp_path / "second")
    assert not fresh.weed_ports_chosen
    fresh.weed_port_base = base = _free_port_range(len(_WEED_PORT_FLAGS), start=40000)  # the default may be in use here
    with socket.socket() as held:
        held.bind((HOST, base + 2))  # one of the range, as a running instance would
        fresh._move_weed_ports_if_taken()
        assert fresh.weed_port_base >= base + 100 and base + 2 not in fresh.weed_ports.values()
        monkeypatch.setenv("PERENNIAL_WEED_PORT_BASE", str(held.getsockname()[1] - 2))
        chosen = LocalServices.from_env(tmp_path / "third")
        chosen._move_weed_ports_if_taken()
        assert chosen.weed_port_base == held.getsockname()[1] - 2


def test_overrides_are_taken_after_options_too_as_make_run_writes_them(capsys):
    from app.cli import parse

    # `make run ARGS=k=v` runs `perennial run CONFIG --summary-json F k=v`: argparse alone refused the override.
    args = parse(["run", "configs/demo.yaml", "cit.seed_a=1", "--summary-json", "s.json", "cit.optim.lr=1e-4"])
    assert args.overrides == ["cit.seed_a=1", "cit.optim.lr=1e-4"] and args.summary_json == "s.json"
    assert parse(["gc", "configs/demo.yaml", "--dry-run", "retention.min_age_hours=0"]).overrides == ["retention.min_age_hours=0"]
    with pytest.raises(SystemExit) as refused:
        parse(["run", "configs/demo.yaml", "--no-such-option", "cit.optim.lr=1e-4"])
    assert refused.value.code == 2
    assert "unrecognized arguments: --no-such-option (see `perennial run --help`)" in capsys.readouterr().err


def test_config_lists_keys_with_defaults_and_descriptions(capsys):
    assert main(["config", "retention"]) == 0
    out = capsys.readouterr().out
    assert "retention.min_age_hours = 24.0\n    nothing written or used more recently than this is deleted" in out
    assert all(line.startswith(("retention.", "    ")) for line in out.splitlines())
    assert main(["config", "cit.optim.lr"]) == 0 and capsys.readouterr().out.startswith("cit.optim.lr = ")
    assert main(["config", "retention.nosuch"]) == 2
    assert "no setting 'retention.nosuch': the top-level sections and keys are run_name, seed" in capsys.readouterr().err
