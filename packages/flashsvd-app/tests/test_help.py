"""Every command explains itself, with examples, and ``--help`` imports nothing heavy."""

import subprocess
import sys

import pytest

COMMANDS = ["compress", "eval", "finetune", "info", "bench", "demo", "ui"]


def test_root_help_lists_every_command(cli):
    res = cli("--help")
    assert res.exit_code == 0
    for name in COMMANDS:
        assert name in res.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_has_examples(cli, command):
    res = cli(command, "--help")
    assert res.exit_code == 0, res.output
    assert "Examples" in res.stdout
    assert "--debug" in res.stdout


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom flashsvd.app.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("NO-TORCH")


def test_version_lists_the_packages(cli):
    res = cli("--version")
    assert res.exit_code == 0
    assert "flashsvd-app" in res.stdout and "flashsvd-models" in res.stdout
