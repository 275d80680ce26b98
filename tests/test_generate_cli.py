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
