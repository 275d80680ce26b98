"""Every ```python block of README.md runs verbatim (on the CPU, in seconds), and the README's first lines are
the two commands. The blocks run in order, each in a fresh namespace, with the repository as the working
folder; a block may read what the README says to prepare before it, nothing else."""
from __future__ import annotations

import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _blocks(lang: str):
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


PY = _blocks("python")


def test_readme_starts_with_the_two_commands():
    first = _blocks("bash")[0].strip().splitlines()
    assert first[:2] == ['pip install torch==2.13.0 -e . && python -m benchmarks.efficiency',
                         'pip install torch==2.13.0 -e ".[dev]" && python -m pytest -q -n auto']


def test_readme_has_python_blocks():
    assert len(PY) >= 2


@pytest.mark.parametrize("i", range(len(PY)))
def test_readme_python_block_runs(i, monkeypatch):
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    code = compile(PY[i], f"README.md python block {i + 1}", "exec")
    exec(code, {"__name__": f"readme_block_{i + 1}"})


@pytest.mark.slow
def test_readme_torchrun_line_runs_with_the_tiny_config(tmp_path):
    """The README's torchrun command as written (2 processes, configs/tiny.json), on the shipped sample text
    instead of the downloaded one, for 2 steps."""
    import shlex

    from helpers import run_torchrun
    from mom.data import prepare

    line = next(ln for b in _blocks("bash") for ln in b.splitlines() if ln.startswith("torchrun "))
    args = shlex.split(line.split("#")[0])
    assert args[:4] == ["torchrun", "--standalone", "--nproc_per_node", "2"] and "configs/tiny.json" in args
    prepare("sample", str(tmp_path / "data"), "bpe:512", cache=str(tmp_path / "cache"))
    args[args.index("--data") + 1] = str(tmp_path / "data")
    args[args.index("--out-dir") + 1] = str(tmp_path / "run")
    r = run_torchrun(args[1:] + ["--max-steps", "2", "--eval-interval", "2"], 300, "the README's torchrun line")
    assert '"step": 2' in r.stdout


def test_readme_command_lines_parse(monkeypatch):
    """Every `python -m <tool> ...` line of the README's shell blocks is a valid command line for that tool
    (parsed by the tool's own parser, not run)."""
    import importlib
    import shlex

    import mom.cli

    class Parsed(Exception):
        pass

    original = mom.cli.ArgumentParser.parse_known_args

    def parse_then_stop(self, args=None, namespace=None):
        ns, rest = original(self, args, namespace)
        raise Parsed(ns, rest)

    monkeypatch.setattr(mom.cli.ArgumentParser, "parse_known_args", parse_then_stop)
    lines = [ln for b in _blocks("bash") for ln in b.splitlines() if re.search(r"(^| )-m (mom|benchmarks)\.", ln)]
    tools = set()
    for line in lines:
        for cmd in line.split("&&"):
            args = shlex.split(cmd.split("#")[0])
            if "-m" not in args or not args[args.index("-m") + 1].startswith(("mom", "benchmarks")):
                continue
            tool, argv = args[args.index("-m") + 1], args[args.index("-m") + 2:]
            with pytest.raises(Parsed) as parsed:
                importlib.import_module(tool).main(argv)
            assert parsed.value.args[1] == [], (line, parsed.value.args[1])
            tools.add(tool)
    assert {"mom.data", "mom.train", "mom.generate", "mom.analysis", "benchmarks.efficiency"} <= tools, tools
