"""bench_gemv and bench_decode's measurement workers at toy size (seconds)."""
from __future__ import annotations

import csv

from . import bench_decode, bench_gemv


def test_bench_gemv_rows_and_csv(tmp_path):
    path = tmp_path / "gemv.csv"
    rows = bench_gemv.main(["--device", "cpu", "--n-embd", "32", "--modules", "4", "--top-k", "2",
                            "--tokens", "1", "3", "--repeats", "2", "--csv", str(path)])
    assert [(r["op"], r["T"]) for r in rows] == [("ffn", 1), ("qkv", 1), ("ffn", 3), ("qkv", 3)]
    for r in rows:
        assert (r["distinct"] == 2.0) if r["T"] == 1 else (2 <= r["distinct"] <= 4)  # K = 2 distinct per token
        assert r["MB"] > 0 and r["us"] > 0 and r["of_copy"] > 0
    with open(path) as f:
        assert len(list(csv.DictReader(f))) == 4


def test_bench_gemv_refuses_too_many_tokens(capsys):
    import pytest

    with pytest.raises(SystemExit):
        bench_gemv.main(["--device", "cpu", "--tokens", "17", "--csv", ""])
    assert "at most 16 tokens" in capsys.readouterr().err


def test_bench_decode_workers_at_toy_size():
    """One isolated measurement and one interleaved pair, in this process, on a tiny MoM and its vanilla."""
    from mom import MoMConfig

    cfg = MoMConfig.from_name("tiny", n_embd=32, n_head=2, vocab_size=64, n_positions=32, backend="torch")
    common = dict(batch=2, prompt=5, new_tokens=3, device="cpu", dtype="float32", cuda_graph=False)
    r = bench_decode.worker(dict(name="tiny", config=cfg.to_dict(), repeats=1, **common))
    v = bench_decode.worker(dict(name="vanilla", config=cfg.vanilla().to_dict(), repeats=1, **common))
    assert r["ms_per_token"] > 0 and r["cache_MB"] > 0 and r["weights_MB"] > 0
    assert r["read_MB"] > 0 and v["read_MB"] == v["weights_MB"]  # a vanilla reads all it has (a MoM's pools
    # are read again at each routed step: its read_MB can exceed its weights)
    t = bench_decode.pair_worker(dict(name="pair", configs={"tiny": cfg.to_dict(), "vanilla": cfg.vanilla().to_dict()},
                                      **common))
    assert set(t) == {"tiny", "vanilla"} and min(t.values()) > 0
