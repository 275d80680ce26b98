"""benchmarks/quality.py at toy size on the shipped sample text (seconds): every arm runs, the preserving cut
starts at the vanilla's validation loss, the table / JSON / PNG are written, a rerun trains nothing again."""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import quality  # noqa: E402
from mom import data as mdata  # noqa: E402


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "sample"
    mdata.prepare("sample", str(d), "bpe:512", cache=str(d) + "-cache")
    return str(d)


def test_toy_run(sample_data, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["--data", sample_data, "--out", str(out), "--size", "toy", "--seeds", "1", "2", "--in-process"]
    res = quality.main(argv)
    assert set(res["arms"]) == {"plain", "capacity", "capacity_bce", "preserving", "learned", "vanilla", "vanilla_flops"}
    for arm, r in res["arms"].items():
        assert len(r["final"]) == 2 and r["std"] >= 0
    assert res["arms"]["vanilla_flops"]["steps"] == round(res["flops_ratio"] * res["arms"]["vanilla"]["steps"])
    assert 1.5 < res["flops_ratio"] < 2.0
    assert abs(res["start"]["preserving"] - res["start"]["vanilla"]) < 1e-5   # the function-preserving cuts
    assert abs(res["start"]["learned"] - res["start"]["vanilla"]) < 1e-5
    assert {"val_loss_before", "val_loss_after", "val_loss_after_retrain", "val_loss_full_retrain"} <= set(res["removal"])
    for ext in (".json", ".md", ".png"):
        assert os.path.getsize(str(out / "quality") + ext) > 0
    cmds = Path(out / "commands.sh").read_text()
    assert cmds.count("python -m mom.train --config") == 1 + 7 * 2
    with open(out / "configs" / "preserving_s1.json") as f:
        cfg = json.load(f)
    assert cfg["model_overrides"]["routing_prior"] == 50.0 and cfg["init_from"].endswith("phase1")
    with open(out / "configs" / "learned_s1.json") as f:
        assert json.load(f)["model_overrides"]["routing_prior_learned"] is True
    with open(out / "configs" / "capacity_s1.json") as f:
        assert json.load(f)["model_overrides"]["routing"] == "expert_choice"
    with open(out / "configs" / "capacity_bce_s1.json") as f:
        over = json.load(f)["model_overrides"]
        assert over["routing"] == "expert_choice" and over["aux_loss_coef"] == quality.CAPACITY_BCE_COEF
    assert set(res["agreement"]) == {f"{arm}, seed {s}" for arm in ("capacity", "capacity_bce") for s in (1, 2)}
    assert all(0 <= g["agreement"] <= 1 for g in res["agreement"].values())
    assert "inference's" in Path(str(out / "quality") + ".md").read_text()
    capsys.readouterr()
    quality.main(argv)  # rerun: every arm is found finished; the removal experiment runs again
    printed = capsys.readouterr().out
    assert printed.count("done already") == 1 + 7 * 2
    res = quality.main(argv + ["--no-removal", "--arms", "capacity"])  # a subset: capacity and the vanilla
    assert set(res["arms"]) == {"capacity", "vanilla"} and set(res["start"]) == {"capacity", "vanilla"}
    assert "minus_vanilla" in res["arms"]["capacity"] and "removal" not in res
    assert capsys.readouterr().out.count("done already") == 1 + 2 * 2
