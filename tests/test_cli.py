"""One command-line style (mom/cli.py) in every tool: hyphenated options, each described in --help, the older
underscore spellings accepted as hidden aliases, and a bad command line answered in one line that says it is
the command line. Each tool's parser is taken from its own main() (parsed, not run)."""
from __future__ import annotations

import argparse
import importlib
import os
import re

import pytest

import mom.cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ["mom.train", "mom.data", "mom.analysis", "mom.generate", "mom_kernels.aot", "benchmarks.efficiency",
         "benchmarks.bench_step", "benchmarks.bench_model", "benchmarks.bench_routed_ffn", "benchmarks.bench_decode",
         "benchmarks.bench_gemv", "benchmarks.count_launches", "benchmarks.profile_step", "benchmarks.probe_grouped",
         "benchmarks.quality"]
HIDDEN = {"--_worker"}  # internal: a benchmark's own worker processes


class _Parser(Exception):
    pass


def parser_of(tool: str, monkeypatch) -> mom.cli.ArgumentParser:
    """The parser `tool`'s main() builds, caught when it parses."""
    def catch(self, args=None, namespace=None):
        raise _Parser(self)

    monkeypatch.setattr(mom.cli.ArgumentParser, "parse_known_args", catch)
    with pytest.raises(_Parser) as caught:
        importlib.import_module(tool).main([])
    return caught.value.args[0]


def _options(p):
    return [a for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_every_tool_is_listed_and_uses_the_shared_parser():
    """Any file that builds a parser builds mom.cli's, and every such tool is checked here."""
    found = set()
    for pkg in ("mom", "mom_kernels", "benchmarks"):
        for name in sorted(os.listdir(os.path.join(ROOT, pkg))):
            if not name.endswith(".py") or name.startswith("test_") or name == "cli.py":
                continue
            with open(os.path.join(ROOT, pkg, name), encoding="utf-8") as f:
                src = f.read()
            assert "argparse.ArgumentParser(" not in src, f"{pkg}/{name}: build the parser with mom.cli.ArgumentParser"
            if "parse_args(" in src:
                found.add(f"{pkg}.{name[:-3]}")
    assert found == set(TOOLS)


@pytest.mark.parametrize("tool", TOOLS)
def test_options_are_hyphenated_and_described(tool, monkeypatch):
    p = parser_of(tool, monkeypatch)
    assert isinstance(p, mom.cli.ArgumentParser) and p.prog.startswith("python -m ")
    for action in _options(p):
        shown = [s for s in action.option_strings if s not in HIDDEN]
        if not shown:
            continue
        assert all(re.fullmatch(r"--[a-z0-9]+(-[a-z0-9]+)*|-[a-zA-Z]", s) for s in shown), (tool, shown)
        assert action.help and action.help != argparse.SUPPRESS, f"{tool} {shown[0]}: no description in --help"


@pytest.mark.parametrize("tool", TOOLS)
def test_help_lists_every_option(tool, monkeypatch, capsys):
    p = parser_of(tool, monkeypatch)
    text = p.format_help()
    for action in _options(p):
        for s in action.option_strings:
            if s not in HIDDEN:
                assert s in text, (tool, s)
    assert "_" not in "".join(re.findall(r"--[\w-]+", text.split("\n\n", 1)[0])), "usage shows an underscore option"


def test_underscore_spellings_are_hidden_aliases():
    p = mom.cli.ArgumentParser(prog="python -m tool")
    p.add_argument("--max-steps", type=int, help="steps")
    p.add_argument("--out-dir", help="folder")
    p.add_argument("--flag", action="store_true", help="a flag")
    a = p.parse_args(["--max_steps", "5", "--out_dir=runs/x", "--flag"])
    assert (a.max_steps, a.out_dir, a.flag) == (5, "runs/x", True)
    assert p.parse_args(["--out-dir", "runs/my_run"]).out_dir == "runs/my_run"  # values are left alone
    assert "--max_steps" not in p.format_help() and "--max-steps" in p.format_help()


def test_a_bad_command_line_is_one_line_naming_the_command_line(capsys):
    p = mom.cli.ArgumentParser(prog="python -m tool")
    p.add_argument("--max-steps", type=int, help="steps")
    for argv, what in ((["--max-step5", "3"], "unrecognized arguments: --max-step5"),
                       (["--max-steps", "x"], "--max-steps: invalid int value: 'x'")):
        with pytest.raises(SystemExit) as e:
            p.parse_args(argv)
        assert e.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("python -m tool: error on the command line: ") and what in last, last


REQUIRED = {"benchmarks.quality": ["--data", "data/x"], "mom.data": ["--out", "data/x"],
            "mom.analysis": ["--out", "runs/x"], "mom.generate": ["--ckpt", "runs/x", "--data", "data/x"]}


@pytest.mark.parametrize("tool", TOOLS)
def test_each_tool_refuses_an_unknown_option(tool, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(tool).main(REQUIRED.get(tool, []) + ["--no-such-option"])
    assert e.value.code == 2
    assert "error on the command line: unrecognized arguments: --no-such-option" in capsys.readouterr().err
