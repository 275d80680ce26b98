"""benchmarks/efficiency.py without measuring (seconds): the verdict from given tables, both charts, the
analytic run, and where it writes (the ignored output folder unless --update-results)."""
from __future__ import annotations

import os

from . import efficiency as eff
from .common import OUT, RESULTS


def _rows(mem):
    """Measured rows as measure() returns them: gpt2-large, and mom-large-efficient with peak ratios mem."""
    base = dict(model="gpt2-large", params_M=48.5, depth=36, K=1, flops_ratio=1.0)
    mom = dict(model="mom-large-efficient", params_M=48.8, depth=14, K=2, flops_ratio=0.69)
    for mode in eff.MODES:
        base.update({f"{mode}_peak_MB": 400.0, f"{mode}_weights_MB": 200.0, f"{mode}_ms": 10.0,
                     f"{mode}_time_ratio": 1.0, f"{mode}_mem_ratio": 1.0})
        mom.update({f"{mode}_peak_MB": 400.0 * mem[mode], f"{mode}_weights_MB": 200.0, f"{mode}_ms": 9.0,
                    f"{mode}_time_ratio": 0.9, f"{mode}_mem_ratio": mem[mode]})
    return [base, mom]


def test_verdict_judges_each_claim():
    rows = _rows({"train": 0.66, "prefill": 0.55, "decode": 0.70})
    v = {x["claim"]: x for x in eff.verdict(eff.analytic_rows(), rows, eff.MODES)}
    flops = v["efficient MoM: forward TFLOPs / GPT-2-large's"]
    assert flops["holds"] == "yes" and flops["paper"] == "0.84x" and "0.690x counted" in flops["ours"]
    mem = {k.split(", ")[-1].split(" ")[0]: x for k, x in v.items() if "peak memory" in k}
    assert {k: x["holds"] for k, x in mem.items()} == {"training": "no", "inference": "yes", "one-token": "no"}
    assert "weights 0.50" in mem["inference"]["why"]
    assert v["deep MoM: graph over 38% deeper"]["holds"] == "yes"
    quality = [x for k, x in v.items() if "quality" in k]
    assert quality and quality[0]["holds"] == "not shown"
    assert "holds" in eff.verdict_text(list(v.values())).splitlines()[0]


def test_charts_are_drawn(tmp_path):
    rows = _rows({"train": 0.66, "prefill": 0.79, "decode": 0.70})
    eff.claim_chart(eff.analytic_rows(), rows, eff.MODES, str(tmp_path / "claim.png"), "test")
    eff.chart(rows, eff.MODES, str(tmp_path / "all.png"), "test")
    assert (tmp_path / "claim.png").stat().st_size > 1000 and (tmp_path / "all.png").stat().st_size > 1000


def test_analytic_run_writes_only_into_out(tmp_path, capsys):
    before = {f: os.path.getmtime(os.path.join(RESULTS, f)) for f in os.listdir(RESULTS)}
    eff.main(["--analytic-only", "--out", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == ["efficiency_analytic.csv", "efficiency_analytic.md"]
    assert {f: os.path.getmtime(os.path.join(RESULTS, f)) for f in os.listdir(RESULTS)} == before
    assert "Verdict" in capsys.readouterr().out
    assert os.path.basename(OUT) == "out"
