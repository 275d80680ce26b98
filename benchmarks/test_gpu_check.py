"""benchmarks/gpu_check.sh, checked on the CPU: the script is meant to run through in one go on a CUDA machine,
so a typo in it must fail here, not there. Its shell syntax; every `python -m benchmarks.<name> ...` command line against that
benchmark's own argument parser (parsed, not run: the sizes are the H200's); the test files it names exist; the
MOM_KERNELS_* settings it sets are ones the kernels read; the helpers its summary imports exist."""
from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
_STOP = {">", ">>", "|", "||", "&&", "2>&1", ";"}


def _script_lines(path=SCRIPT):
    """The script's lines with backslash continuations joined."""
    with open(path) as f:
        return f.read().replace("\\\n", " ").splitlines()


def benchmark_commands(path=SCRIPT):
    """[(module name, argv)] of every `python -m benchmarks.<name> args` in the script, argv cut at the first
    redirection, pipe or `||`."""
    out = []
    for line in _script_lines(path):
        if line.lstrip().startswith("#"):
            continue
        for m in re.finditer(r"python -m benchmarks\.(\w+)(.*)", line):
            argv = []
            for tok in shlex.split(m.group(2), comments=True):
                if tok in _STOP or tok.startswith(">") or tok.startswith("2>"):
                    break
                argv.append(tok)
            out.append((m.group(1), argv))
    return out


class _Parsed(Exception):
    """Raised by the patched parse_args once the command line parsed: main() stops there."""


def parse_only(module: str, argv, monkeypatch):
    """Run benchmarks.<module>.main(argv) up to its argument parsing; SystemExit 2 on a bad command line."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    mod = importlib.import_module(f"benchmarks.{module}")
    with pytest.raises(_Parsed) as parsed:
        mod.main(list(argv))
    return parsed.value.args[0]


def test_shell_syntax():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_every_benchmark_command_parses(monkeypatch):
    commands = benchmark_commands()
    # the stages the script's header lists: step, model, routed_ffn (sweep, TMA sweep, tiles), tuned step,
    # timeline, decode, gemv
    assert {m for m, _ in commands} >= {"bench_step", "bench_model", "bench_routed_ffn", "profile_step",
                                        "bench_decode", "bench_gemv"}, commands
    assert len(commands) >= 9, commands
    for module, argv in commands:
        ns = parse_only(module, argv, monkeypatch)
        if "--device" in argv:
            assert ns.device == "cuda", (module, argv)


def test_a_bad_command_line_fails(monkeypatch):
    """The check can fail: an option the parser does not know exits with 2."""
    module, argv = benchmark_commands()[0]
    with pytest.raises(SystemExit) as e:
        parse_only(module, argv + ["--no-such-option"], monkeypatch)
    assert e.value.code == 2


def test_named_test_files_exist():
    text = " ".join(_script_lines())
    names = re.findall(r"tests/test_\w+\.py", text)
    assert len(names) >= 10
    missing = [n for n in names if not os.path.exists(os.path.join(ROOT, n))]
    assert not missing, f"gpu_check.sh names test files that do not exist: {missing}"


def test_kernel_settings_are_read():
    """Every MOM_KERNELS_* variable the script sets is read somewhere in mom_kernels/ or mom/."""
    text = " ".join(_script_lines())
    settings = set(re.findall(r"\b(MOM_KERNELS_\w+)=", text))
    assert {"MOM_KERNELS_TMA", "MOM_KERNELS_AUTOTUNE"} <= settings
    sources = ""
    for pkg in ("mom_kernels", "mom"):
        for name in os.listdir(os.path.join(ROOT, pkg)):
            if name.endswith(".py"):
                with open(os.path.join(ROOT, pkg, name)) as f:
                    sources += f.read()
    unread = [s for s in sorted(settings) if f'"{s}"' not in sources]
    assert not unread, f"gpu_check.sh sets variables nothing reads: {unread}"


def test_summary_helpers_exist():
    for mod, name in re.findall(r"from benchmarks\.(\w+) import (\w+)", " ".join(_script_lines())):
        assert hasattr(importlib.import_module(f"benchmarks.{mod}"), name), (mod, name)
