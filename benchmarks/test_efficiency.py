"""benchmarks/efficiency.py in seconds: the verdict from given tables, both charts, the analytic rows and the
scaled configs against the configs, measure()'s counts and ratios (forwards measured in this process at a
tiny scale), and where it writes (the ignored output folder unless --update-results)."""
from __future__ import annotations

import os

import pytest

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
    text = eff.verdict_text(list(v.values()))
    assert text.splitlines()[0].startswith("[yes] efficient MoM") and "[not shown]" in text
    assert max(len(line) for line in text.splitlines()) <= 120  # fits a 120-column terminal


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


def test_analytic_rows_against_the_configs():
    """Each analytic row: FLOPs and parameters against its same-width GPT-2 (mom.flops, from the configs), and
    the KV cache ratio = the ratio of attention calls (one cache per call, the same width), e.g. 14 / 36 for the
    efficient MoM."""
    from mom import flops

    rows = {r["model"]: r for r in eff.analytic_rows()}
    assert set(rows) == {r[0] for r in eff.ROWS}
    for name, r in rows.items():
        cfg = eff.row_config(name)
        base = eff.row_config(eff.BASELINE[cfg.n_embd])
        assert r["baseline"] == eff.BASELINE[cfg.n_embd] and r["depth"] == cfg.graph_depth
        assert r["flops_ratio"] == flops.expected(cfg, 1, 1024) / flops.expected(base, 1, 1024)
        assert r["params_ratio"] == flops.num_parameters(cfg) / flops.num_parameters(base)
        assert r["kv_cache_ratio"] == r["depth_ratio"] == cfg.graph_depth / base.graph_depth
    assert rows["mom-large-efficient"]["kv_cache_ratio"] == 14 / 36
    assert rows["gpt2-large"]["flops_ratio"] == 1.0


def test_scaled_configs_shrink_width_vocab_routers_and_keep_the_layout():
    big = eff.row_config("mom-large-efficient")
    s = eff.scaled(big, 0.25, 256)
    assert (s.n_embd, s.n_head, s.vocab_size, s.router_dim, s.n_positions) == (320, 20, 12564, 64, 256)
    assert (s.chunks, s.depth, s.n_attn, s.n_ffn, s.top_k, s.n_bottom, s.n_top) == (2, 5, 16, 16, 2, 1, 1)
    tiny = eff.scaled(big, 1 / 64, 16)
    assert (tiny.n_embd, tiny.vocab_size, tiny.router_dim, tiny.n_positions) == (20, 785, 4, 16)
    assert eff.scaled(big, 1.0, 2048) == big.replace(n_positions=2048)


def test_measured_rows_count_the_picks_and_divide_by_the_same_width_gpt2(monkeypatch):
    """measure() at a tiny scale, each forward measured in this process (mom.memory's worker function instead of
    a fresh interpreter: the same measurement), routers as initialised so some picks are SKIP: each row's
    counted GFLOPs are the forward's count, its flops_ratio the counted ratio to gpt2-large's (not the
    analytic one), time and memory ratios likewise."""
    import argparse

    from mom import memory

    seen = {}

    def in_process(spec, timeout=None):
        r = memory._measure_here(spec)
        seen[eff.CLAIM_MOM if spec.config["chunks"] else eff.CLAIM_BASE] = r
        return r

    monkeypatch.setattr(eff, "measure_isolated", in_process)
    args = argparse.Namespace(models=[eff.CLAIM_MOM], modes=["prefill"], scale=1 / 64, seq_len=16, batch=1,
                              dtype="float32", device="cpu", routing="init", repeats=1, seed=0, jobs=1)
    rows = {r["model"]: r for r in eff.measure(args)}
    assert list(rows) == [eff.CLAIM_BASE, eff.CLAIM_MOM]          # the MoM brings its GPT-2
    for name, r in seen.items():
        assert rows[name]["GFLOPs_counted"] == r["flops"]["total"] / 1e9
        assert rows[name]["skip_share"] == r["skip_share"]
        assert rows[name]["prefill_ms"] == r["time_s"] * 1e3
    mom, base = rows[eff.CLAIM_MOM], rows[eff.CLAIM_BASE]
    assert mom["skip_share"] > 0 and mom["GFLOPs_counted"] < mom["GFLOPs_analytic"]
    want = seen[eff.CLAIM_MOM]["flops"]["total"] / seen[eff.CLAIM_BASE]["flops"]["total"]
    assert mom["flops_ratio"] == pytest.approx(want, rel=1e-12)
    assert mom["prefill_time_ratio"] == mom["prefill_ms"] / base["prefill_ms"]
    assert mom["prefill_mem_ratio"] == mom["prefill_peak_MB"] / base["prefill_peak_MB"]
    assert base["flops_ratio"] == 1.0


def test_any_pair_gets_the_table_and_verdict(tmp_path, capsys):
    """--pair VANILLA,MOM (a Llama-family pair here): its analytic rows against its vanilla, the efficient-MoM
    claims held against it (no deep-MoM rows), files named after the MoM; a bad pair is refused by name."""
    import pytest

    pair = ("smollm-135m", "mom-smollm-135m-efficient")
    rows = {r["model"]: r for r in eff.analytic_rows(pair=pair)}
    assert set(rows) == set(pair) and rows[pair[0]]["flops_ratio"] == 1.0
    assert 0.6 < rows[pair[1]]["flops_ratio"] < 0.8 and rows[pair[1]]["kv_cache_ratio"] == 12 / 30
    v = {x["claim"]: x for x in eff.verdict(list(rows.values()), None, eff.MODES, pair=pair)}
    assert v["efficient MoM: forward TFLOPs / smollm-135m's"]["holds"] == "yes"
    assert v["efficient MoM: over 60% less depth"]["ours"] == "12 vs 30 (0.40x)"
    assert not any("deep MoM" in k for k in v)
    eff.main(["--analytic-only", "--out", str(tmp_path), "--pair", ",".join(pair)])
    assert sorted(os.listdir(tmp_path)) == [f"efficiency_analytic_{pair[1]}.csv", f"efficiency_analytic_{pair[1]}.md"]
    assert "smollm-135m's" in capsys.readouterr().out
    for bad in ("smollm-135m", "mom-smollm-135m-efficient,smollm-135m", "gpt2-large,mom-smollm-135m-efficient",
                "smollm-135m,nope"):
        with pytest.raises(SystemExit):
            eff.main(["--analytic-only", "--out", str(tmp_path), "--pair", bad])
        assert "--pair" in capsys.readouterr().err

