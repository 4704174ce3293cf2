"""The console scripts of pyproject.toml name importable mains, one per `python -m experiments.<name>` tool
(nothing is installed: pyproject is parsed and each target imported)."""

import importlib
import inspect
import tomllib
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
SCRIPTS = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]


def test_every_command_line_tool_has_a_script():
    assert SCRIPTS == {"uniql-compress": "experiments.compress:main", "uniql-evaluate": "experiments.evaluate:main",
                       "uniql-generate": "experiments.generate:main", "uniql-train-tiny": "experiments.train_tiny:main"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_names_an_importable_main_callable_without_arguments(name):
    module_name, _, attr = SCRIPTS[name].partition(":")
    main = getattr(importlib.import_module(module_name), attr)
    assert callable(main)
    # a console script calls main() with no arguments: every parameter needs a default
    assert all(p.default is not inspect.Parameter.empty for p in inspect.signature(main).parameters.values())
    with pytest.raises(SystemExit) as exit_:  # and it is the tool: --help through sys.argv exits 0
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("sys.argv", [name, "--help"])
            main()
    assert exit_.value.code == 0
