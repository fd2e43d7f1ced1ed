"""The one `srcid` entry point: help lists every sub-command; a named sub-command loads only its own module."""

from __future__ import annotations

import subprocess
import sys

import pytest

from srcid.cli import COMMANDS, main


def test_help_lists_every_command_and_each_command_has_its_own(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    listed = capsys.readouterr().out
    for name, _ in COMMANDS:
        assert name in listed
        with pytest.raises(SystemExit) as exit_info:
            main(["-v", name, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: srcid {name}" in capsys.readouterr().out


def test_a_wrong_command_is_a_usage_error_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err and all(name in err for name, _ in COMMANDS)


def test_a_named_command_imports_only_its_own_module():
    """`srcid serve` must reach its own code before anything loads torch (it sets OpenMP up first), so the CLI may not
    import the other sub-commands' modules, whose training code loads torch."""
    code = ("import sys\nfrom srcid.cli import main\ntry:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'srcid.training.train_cli', 'srcid.training.export') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
