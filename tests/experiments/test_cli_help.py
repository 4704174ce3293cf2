"""`--help` of every command-line tool exits 0 and explains every option its parser defines."""

import argparse
import importlib

import pytest

CLIS = ["experiments.compress", "experiments.evaluate", "experiments.generate", "benchmarks.benchmark"]


@pytest.mark.parametrize("name", CLIS)
def test_help_explains_every_option(name, capsys):
    module = importlib.import_module(name)
    parser = module.build_parser()
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    squeezed = "".join(text.split())  # argparse re-wraps help text (also at hyphens)
    options = [a for a in parser._actions if a.option_strings]
    assert len(options) >= 3
    formatter = parser._get_formatter()
    for action in options:
        assert action.help and action.help != argparse.SUPPRESS, f"{name}: {action.option_strings} has no help"
        for flag in action.option_strings:
            assert flag in text, f"{name} --help does not mention {flag}"
        assert "".join(formatter._expand_help(action).split()) in squeezed, (name, action.option_strings)
