"""`python -m mom.generate`: samples text from a saved checkpoint with the data folder's tokenizer; bad paths
exit 2 with one line naming them."""
import subprocess
import sys

import pytest
import torch

from mom import MoMConfig, MoMForCausalLM
from mom import data as mdata
from mom.generate import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    mdata.prepare("sample", str(root / "data"), "bpe:512", cache=str(root / "cache"))
    torch.manual_seed(0)
    model = MoMForCausalLM(MoMConfig.from_name("tiny"))
    model.save_pretrained(str(root / "run" / "ckpt"))
    return root


def test_samples_text(run, capsys):
    rc = main(["--ckpt", str(run / "run"), "--data", str(run / "data"), "--prompt", "The king",
               "--max-new-tokens", "8", "--num-samples", "2", "--seed", "3"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("--- sample") == 2 and "The king" in out
    main(["--ckpt", str(run / "run"), "--data", str(run / "data"), "--prompt", "The king", "--max-new-tokens", "8",
          "--num-samples", "2", "--seed", "3"])
    assert capsys.readouterr().out == out  # seeded: the same samples


def test_bad_paths_exit_2(run, tmp_path):
    p = subprocess.run([sys.executable, "-m", "mom.generate", "--ckpt", str(tmp_path / "nope"), "--data",
                        str(run / "data")], capture_output=True, text=True)
    assert p.returncode == 2 and "nope" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "mom.generate", "--ckpt", str(run / "run"), "--data",
                        str(tmp_path / "nodata")], capture_output=True, text=True)
    assert p.returncode == 2 and "nodata" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("args,expect", [
    (["--max-new-tokens", "0"], "error on the command line: --max-new-tokens 0 --num-samples 1: both must be >= 1"),
    (["--num-samples", "0"], "error on the command line: --max-new-tokens 50 --num-samples 0: both must be >= 1"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--max-new-tokens", "100"], "exceed config.n_positions=64"),
])
def test_bad_options_exit_2_with_one_line(run, capsys, args, expect):
    try:
        rc = main(["--ckpt", str(run / "run"), "--data", str(run / "data"), "--prompt", "The king"] + args)
    except SystemExit as e:  # a bad command line (mom.cli)
        rc = e.code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2 and expect in err and len(err.splitlines()) == 1 and captured.out == "", err
