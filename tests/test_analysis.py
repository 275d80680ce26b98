"""mom.analysis: pick frequencies, heatmaps, module removal (exact when the removed modules are never picked)."""
import json
import os

import numpy as np
import pytest
import torch

from mom import MoMConfig, MoMForCausalLM
from mom import analysis
from mom import data as mdata


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "sample"
    mdata.prepare("sample", str(d), "bpe:512", cache=str(d) + "-cache")
    return str(d)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MoMConfig.from_name("tiny", backend="torch", **kw)
    m = MoMForCausalLM(cfg)
    with torch.no_grad():  # routers that make token-dependent picks (GPT-2 init gives near-constant ones)
        for name, p in m.named_parameters():
            if "_router." in name and p.dim() == 2:
                p.normal_(0.0, 3.0 / p.shape[1] ** 0.5)
    return m


def test_pick_frequencies_and_heatmaps(sample_data, tmp_path):
    m = tiny_model()
    val = mdata.TokenData(sample_data, "val", 64)
    f = analysis.pick_frequencies(m, val)
    cfg = m.config
    assert np.asarray(f["attn"]).shape == (cfg.chunks, cfg.depth, cfg.n_attn + 1)
    assert np.asarray(f["ffn"]).shape == (cfg.chunks, cfg.depth, cfg.n_ffn + 1)
    assert np.allclose(np.asarray(f["attn"]).sum(-1), 1) and np.allclose(np.asarray(f["ffn"]).sum(-1), 1)
    paths = analysis.plot_heatmaps(f, str(tmp_path))
    assert len(paths) == cfg.chunks and all(os.path.getsize(p) > 1000 for p in paths)


def test_least_used():
    freqs = {"attn": [[[0.5, 0.1, 0.3, 0.1], [0.4, 0.0, 0.4, 0.2]]],   # 1 chunk, 2 steps, 3 modules + SKIP
             "ffn": [[[0.1, 0.2, 0.3, 0.2, 0.2], [0.1, 0.2, 0.3, 0.2, 0.2]]]}
    d = analysis.least_used(freqs, 0.34, 0.25)
    assert d == {"attn": [[1]], "ffn": [[0]]}
    with pytest.raises(ValueError):
        analysis.least_used(freqs, 1.0, 0.0)


@pytest.mark.parametrize("frac,pool,n", [
    (0.5, 3, 2),     # the paper's 50% of a pool of 3: rounding gives 2, flooring 1
    (0.5, 5, 3),     # a half rounds up (Python's round would go to the even 2)
    (0.5, 4, 2), (0.25, 4, 1), (0.3, 3, 1), (0.1, 4, 0), (0.74, 4, 3), (0.5, 16, 8), (0.25, 16, 4),
])
def test_removal_counts_round_to_nearest_halves_up(frac, pool, n):
    """The documented rule (analysis.removal_count): frac * pool to the nearest integer, halves up; least_used
    drops that many modules of every chunk, the least picked."""
    assert analysis.removal_count(frac, pool) == n
    use = np.arange(pool, 0, -1, dtype=float)                  # module e picked pool - e times: the last least
    step = np.append(use, 0.0) / use.sum()                     # one step's shares, SKIP column 0
    freqs = {"attn": [[step.tolist()]], "ffn": [[step.tolist()]]}
    d = analysis.least_used(freqs, frac, 0.0)
    assert d["attn"] == [list(range(pool - n, pool))] and d["ffn"] == [[]]


def test_least_used_breaks_ties_toward_the_higher_id():
    freqs = {"attn": [[[0.2, 0.3, 0.2, 0.3, 0.0]]], "ffn": [[[0.5, 0.5, 0.0]]]}   # modules 0 and 2 tie
    assert analysis.least_used(freqs, 0.25, 0.5) == {"attn": [[2]], "ffn": [[1]]}


def test_removing_never_picked_modules_changes_nothing():
    """Modules whose router logit is -1e4 are never picked and have probability 0: removing them (and their
    router rows) must leave the logits unchanged."""
    m = tiny_model(seed=1).double()
    drop_a, drop_f = [[2], [0]], [[1, 3], [0, 2]]
    with torch.no_grad():
        for c in range(m.config.chunks):
            m.chunks[c].attn_router.head.bias[drop_a[c]] = -1e4
            m.chunks[c].ffn_router.head.bias[drop_f[c]] = -1e4
    small = analysis.remove_modules(m, drop_a, drop_f)
    assert (small.config.n_attn, small.config.n_ffn) == (2, 2)
    x = torch.randint(0, 512, (3, 40))
    a, b = m(x), small(x)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-9, atol=1e-9)
    for ra, rb in zip(a.routing[0], b.routing[0]):  # chunk 0 kept attention modules [0, 1], SKIP 3 -> 2
        mapped = torch.tensor([0, 1, -1, 2])[ra.attn_ids]
        assert torch.equal(mapped, rb.attn_ids)
    with torch.no_grad():  # the kept modules' weights moved with them
        assert torch.equal(small.chunks[1].attn_pool.c_attn_weight, m.chunks[1].attn_pool.c_attn_weight[[1, 2]])
        assert torch.equal(small.chunks[0].ffn_router.head.weight, m.chunks[0].ffn_router.head.weight[[0, 2, 4]])


def test_removal_keeps_the_learned_routing_prior_columns():
    """A cut with a learned routing prior (prior_bias [depth, slots]): its columns go with the kept modules."""
    m = tiny_model(seed=2, routing_prior=50.0, routing_prior_learned=True).double()
    x = torch.randint(0, 512, (2, 24))
    m.train()
    m(x)                                    # past the first training forward: the fixed prior is off
    m.eval()
    drop_a, drop_f = [[2], [0]], [[1, 3], [0, 2]]
    with torch.no_grad():
        for c in range(m.config.chunks):
            m.chunks[c].attn_router.head.bias[drop_a[c]] = -1e4
            m.chunks[c].ffn_router.head.bias[drop_f[c]] = -1e4
            m.chunks[c].ffn_router.prior_bias.normal_()
    small = analysis.remove_modules(m, drop_a, drop_f)
    torch.testing.assert_close(small(x).logits, m(x).logits, rtol=1e-9, atol=1e-9)
    assert torch.equal(small.chunks[0].ffn_router.prior_bias, m.chunks[0].ffn_router.prior_bias[:, [0, 2, 4]])


def test_removal_reroutes_and_rejects_bad_requests():
    m = tiny_model(seed=2)
    small = analysis.remove_modules(m, [[0, 1], [1, 2]], [[3], [3]])
    out = small(torch.randint(0, 512, (2, 16)))
    for steps in out.routing:
        for r in steps:
            assert int(r.attn_ids.max()) <= 1 and int(r.ffn_ids.max()) <= 3   # 1 module + SKIP; 3 + SKIP
    with pytest.raises(ValueError, match="as many"):
        analysis.remove_modules(m, [[0], [0, 1]], [[], []])
    with pytest.raises(ValueError, match="bad attn module ids"):
        analysis.remove_modules(m, [[5], [0]], [[], []])
    with pytest.raises(ValueError, match="n_attn=0"):  # the config validates the smaller pools
        analysis.remove_modules(m, [[0, 1, 2], [0, 1, 2]], [[], []])


def test_cli_routing_removal_and_retrain(sample_data, tmp_path):
    m = tiny_model(seed=3)
    ckpt = tmp_path / "ckpt"
    m.save_pretrained(str(ckpt))
    n = torch.get_num_threads()
    try:
        analysis.main(["--ckpt", str(ckpt), "--data", sample_data, "--out", str(tmp_path / "a"),
                       "--remove-attn", "0.34", "--remove-ffn", "0.25", "--retrain-steps", "2", "--threads", "1"])
    finally:
        torch.set_num_threads(n)
    res = json.load(open(tmp_path / "a" / "removal.json"))
    assert res["n_attn"] == [3, 2] and res["n_ffn"] == [4, 3] and res["params"][1] < res["params"][0]
    for k in ("val_loss_before", "val_loss_after", "val_loss_after_retrain", "val_loss_full_retrain"):
        assert np.isfinite(res[k])
    f = json.load(open(tmp_path / "a" / "routing.json"))
    assert len(f["attn"]) == 2 and os.path.exists(tmp_path / "a" / "routing_chunk1.png")
    small = MoMForCausalLM.from_pretrained(str(tmp_path / "a" / "pruned"))
    assert small.config.n_attn == 2


def _metrics_file(run, rows):
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_loss_curves_continue_the_init_from_runs_token_axis(tmp_path):
    """plot_curves: a run's tokens start where its init_from run's ended (phase 2 continues phase 1's axis),
    through a chain of runs; the summary and the Markdown table give each run's last step, its own tokens, the
    tokens it started from, its last validation loss and its median tok/s."""
    runs = [tmp_path / n for n in ("p1", "p2", "p3")]
    for i, run in enumerate(runs):
        per = 100 * (i + 1)                                   # tokens per step: 100, 200, 300
        rows = [{"step": s, "tokens": per * s, "lm_loss": 5.0 - s / 10 - i, "tok_per_s": 1000.0 * s} for s in
                range(1, 5)]
        rows += [{"step": s, "tokens": per * s, "val_loss": 4.5 - s / 10 - i} for s in (2, 4)]
        _metrics_file(run, rows)
        if i:                                                 # init_from: the previous run's checkpoint folder
            with open(run / "run.json", "w") as f:
                json.dump({"train": {"init_from": str(runs[i - 1] / "ckpt")}}, f)
    summary = analysis.plot_curves([str(r) for r in runs], str(tmp_path / "c.png"), table=str(tmp_path / "t.md"))
    assert [s["start_tokens"] for s in summary] == [0, 400, 400 + 800]
    assert [s["tokens"] for s in summary] == [400, 800, 1200] and [s["steps"] for s in summary] == [4, 4, 4]
    assert [s["val_loss"] for s in summary] == pytest.approx([4.1, 3.1, 2.1])
    assert [s["tok_per_s"] for s in summary] == [2500.0] * 3
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines[0].startswith("| run | steps |") and len(lines) == 2 + 3
    assert lines[3] == "| p2 | 4 | 800 | 3.1000 | 22.20 | 2,500 |"
    assert os.path.getsize(tmp_path / "c.png") > 1000


def test_cli_bad_settings_exit_2_naming_the_option(sample_data, tmp_path, capsys):
    for args, expect in ((["--windows", "0"], "--windows 0: must be >= 1"),
                         (["--remove-attn", "1.0"], "--remove-attn 1.0: must be in [0, 1)"),
                         (["--retrain_lr", "nan"], "--retrain-lr nan: must be a finite number > 0"),  # old spelling
                         ([], "--ckpt and --data are needed")):
        with pytest.raises(SystemExit) as e:
            analysis.main(["--out", str(tmp_path / "a")] + args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and expect in err, err
    with pytest.raises(SystemExit) as e:                      # a missing checkpoint: one line naming it
        analysis.main(["--ckpt", str(tmp_path / "nope"), "--data", sample_data, "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("python -m mom.analysis: error:") and "nope" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "a").exists()
