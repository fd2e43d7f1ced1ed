"""The one `srcid` entry point: help lists every sub-command; a named sub-command loads only its own module."""

from __future__ import annotations

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
