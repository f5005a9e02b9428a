"""``python -m fused_accum ... --help`` explains every option and its default; ``--version``."""
import argparse
import subprocess
import sys

import pytest

import fused_accum
from fused_accum.__main__ import build_parser

COMMANDS = {"bench", "check", "demo", "info", "tune"}


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action


def test_every_command_is_listed_with_what_it_does():
    commands = _subcommands(build_parser())
    assert set(commands.choices) == COMMANDS
    listed = {choice.dest: choice.help for choice in commands._choices_actions}
    assert set(listed) == COMMANDS and all(text and text.strip() for text in listed.values()), listed
    for name, parser in commands.choices.items():
        assert parser.description and parser.description.strip(), name


@pytest.mark.parametrize("command", [None, *sorted(COMMANDS)])
def test_every_option_has_a_description_and_its_default(command):
    parser = build_parser()
    if command is not None:
        parser = _subcommands(parser).choices[command]
    parser.format_help()   # no formatting errors (a stray % in a help text)
    formatter = parser._get_formatter()
    options = [a for a in parser._actions if a.option_strings]
    assert options
    for action in options:
        name = "/".join(action.option_strings)
        assert action.help and action.help.strip(), f"{command} {name}: no help"
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        shown = formatter._expand_help(action)
        assert "default" in shown and "default: None" not in shown, f"{command} {name}: {shown}"


def test_version():
    result = subprocess.run([sys.executable, "-m", "fused_accum", "--version"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"fused_accum {fused_accum.__version__}"
