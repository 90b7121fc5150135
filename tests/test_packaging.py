"""Each framework package imports without the other framework, and the `tnt` command dispatches."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from experiments import cli

BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ImportError(f"{{name}} is blocked in this test")
    sys.meta_path.insert(0, Block())
    import {package}
    assert not any(m.split(".")[0] in {blocked!r} for m in sys.modules), "blocked module loaded"
    print("ok")
""")


@pytest.mark.parametrize("package,blocked", [("tnt_jax", ("torch",)), ("tnt_torch", ("jax", "flax")),
                                             ("tnt", ("jax", "flax", "torch"))])
def test_package_imports_without_the_other_framework(package, blocked):
    code = BLOCK.format(package=package, blocked=set(blocked))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_cli_suggests_a_close_command(capsys):
    assert cli.main(["pretrian"]) == 2
    assert "did you mean 'pretrain'" in capsys.readouterr().err


def test_cli_lists_commands_and_version(capsys):
    assert cli.main(["--help"]) == 0
    assert "pretrain" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    import tnt

    assert capsys.readouterr().out.strip() == f"tnt {tnt.__version__}"


def test_cli_runs_the_named_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["prepare", "--help"])
    assert exit_.value.code == 0
    assert "experiments.prepare" in capsys.readouterr().out


def test_a_mistyped_flag_names_the_closest(capsys):
    from experiments import pretrain

    with pytest.raises(SystemExit) as exit_:
        pretrain.parse_args(["--maxsteps", "3"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --maxsteps (did you mean --max-steps?) 3" in capsys.readouterr().err
