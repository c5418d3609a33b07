import subprocess
import sys

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
