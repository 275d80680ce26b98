"""MOM_KERNELS_AUTOTUNE=1 (`mom_kernels.autotune`): each grouped GEMM's key is timed once over its candidates
(fused on 4 slices or the whole tile, fused on a persistent grid, split, grouped_mm), the fastest is kept and
launched from then on, outputs and gradients still match the fp64 reference; a candidate that fails is never
chosen; nothing is timed while a CUDA graph is being captured; modes, grid or slices set by hand turn tuning
off. The timer is replaced by one that tells which candidate ran from the launches it sees and returns a set time
for it, so the choice is known in advance (real timings would be the interpreter's)."""
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mom_kernels import autotune, gemm  # noqa: E402
from mom_kernels.routing import default_block_m  # noqa: E402
from mom_kernels.testing import assert_matches_reference, routed_case  # noqa: E402
from mom_kernels.testing import outputs_and_grads as _run  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T = default_block_m(torch.device(DEVICE)) + 7
SET_MS = {("fused", 4, 0): 3.0, ("fused", 1, 0): 2.0, ("fused", 4, 2): 2.5, ("split", 1, 0): 1.0,
          ("grouped_mm", 1, 0): 4.0}


class _Spy:
    """Records what a run launched: the GEMM kernel's EPI_SUBTILE and grid, the epilogue pass, torch._grouped_mm."""

    def __init__(self, monkeypatch):
        self.seen = []
        spy = self

        class Wrap:
            def __init__(self, name, kernel):
                self.name, self.kernel = name, kernel

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    spy.seen.append((self.name, (kwargs.get("EPI_SUBTILE"), grid[0])))
                    return self.kernel[grid](*args, **kwargs)
                return launch

        monkeypatch.setattr(gemm, "_grouped_gemm_kernel", Wrap("gemm", gemm._grouped_gemm_kernel))
        monkeypatch.setattr(gemm, "_rows_epilogue_kernel", Wrap("epilogue", gemm._rows_epilogue_kernel))
        real_mm = torch._grouped_mm
        monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: spy.seen.append(("grouped_mm", None)) or
                            real_mm(*a, **k))

    def candidate(self, n_work):
        names = [n for n, _ in self.seen]
        if "grouped_mm" in names:
            return ("grouped_mm", 1, 0)
        if "epilogue" in names:
            return ("split", 1, 0)
        slices, programs = next(s for n, s in self.seen if n == "gemm")
        return ("fused", slices, 0 if programs == n_work[0] else 2)


@pytest.fixture
def tuned(monkeypatch):
    monkeypatch.setenv("MOM_KERNELS_AUTOTUNE", "1")
    monkeypatch.delenv("MOM_KERNELS_GEMM", raising=False)
    monkeypatch.delenv("MOM_KERNELS_GEMM_CONFIG", raising=False)
    monkeypatch.delenv("MOM_KERNELS_PERSISTENT", raising=False)
    autotune.clear()
    spy = _Spy(monkeypatch)
    timed = []

    n_work = [None]
    real_programs = gemm.gemm_programs
    monkeypatch.setattr(gemm, "gemm_programs", lambda n, d, p=None: n_work.__setitem__(0, n) or real_programs(n, d, p))

    def fake_timer(run, device):
        spy.seen.clear()
        run()
        c = spy.candidate(n_work)
        timed.append(c)
        if c == ("grouped_mm", 1, 0):
            raise RuntimeError("grouped_mm unsupported here")  # a failing candidate is never chosen
        return SET_MS[c]

    monkeypatch.setattr(autotune, "time_candidate", fake_timer)
    yield spy, timed
    autotune.clear()


@pytest.mark.parametrize("op", ["ffn", "linear"])
def test_autotune_keeps_the_fastest(op, tuned):
    spy, timed = tuned
    ts, fn, ref, grad_idx, N = routed_case(op, T, 2, 4, 32, 48, seed=40, empty=(1,), device=DEVICE)
    dy = torch.randn(T, N, dtype=torch.float64, device=DEVICE)
    low = [t.float() if t.is_floating_point() else t for t in ts]
    got = _run(fn, low, grad_idx, dy.float())
    assert_matches_reference(f"{op} tuned", got, ref, low, grad_idx, dy)
    rows = autotune.table()
    assert rows and all(r["choice"] == "split/1" for r in rows), rows
    for r in rows:  # every key timed each candidate once (grouped_mm failing: inf)
        assert r["ms"]["fused/4"] == 3.0 and r["ms"]["fused/1"] == 2.0 and r["ms"]["split/1"] == 1.0
        assert r["ms"]["fused/4/persistent2"] == 2.5
        assert r["ms"].get("grouped_mm/1", float("inf")) == float("inf")
    assert {("fused", 4, 0), ("fused", 1, 0), ("fused", 4, 2)} <= set(timed)
    # later calls launch the kept choice (the epilogue pass after every GEMM) and time nothing
    timed.clear()
    spy.seen.clear()
    again = _run(fn, low, grad_idx, dy.float())
    assert not timed
    gemms = [s for n, (s, _) in spy.seen if n == "gemm"]
    assert gemms and all(s == 1 for s in gemms) and sum(n == "epilogue" for n, _ in spy.seen) == len(gemms)
    for a, b in zip(again, got):
        assert torch.equal(a, b)


def test_autotune_off_when_set_by_hand_or_capturing(tuned, monkeypatch):
    spy, timed = tuned
    ts, fn, ref, grad_idx, N = routed_case("ffn", T, 2, 4, 32, 48, seed=41, device=DEVICE)
    low = [t.float() if t.is_floating_point() else t for t in ts]
    dy = torch.randn(T, N, device=DEVICE)
    monkeypatch.setattr(autotune, "_capturing", lambda t: True)  # a key first met while capturing: the default
    _run(fn, low, grad_idx, dy)
    assert not timed and not autotune.table()
    monkeypatch.setattr(autotune, "_capturing", lambda t: False)
    monkeypatch.setenv("MOM_KERNELS_GEMM", "fused")  # modes set by hand win
    _run(fn, low, grad_idx, dy)
    assert not timed and not autotune.table()
    monkeypatch.delenv("MOM_KERNELS_GEMM")
    monkeypatch.setenv("MOM_KERNELS_GEMM_CONFIG", "EPI_SUBTILE=2")  # so do epilogue slices
    _run(fn, low, grad_idx, dy)
    assert not timed and not autotune.table()
    monkeypatch.delenv("MOM_KERNELS_GEMM_CONFIG")
    monkeypatch.setenv("MOM_KERNELS_PERSISTENT", "1")  # and the grid
    _run(fn, low, grad_idx, dy)
    assert not timed and not autotune.table()
    monkeypatch.setenv("MOM_KERNELS_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="MOM_KERNELS_AUTOTUNE"):
        autotune.enabled(low[0])


def test_autotune_cache_file(tuned, monkeypatch, tmp_path):
    """MOM_KERNELS_AUTOTUNE_CACHE: choices written per device name, read back by a later process (nothing timed,
    same results), other devices' entries kept but not used, an interrupted write leaves the old file, a file
    that is not a table is an error naming it."""
    spy, timed = tuned
    path = tmp_path / "tuned.json"
    monkeypatch.setenv("MOM_KERNELS_AUTOTUNE_CACHE", str(path))
    ts, fn, ref, grad_idx, N = routed_case("ffn", T, 2, 4, 32, 48, seed=42, device=DEVICE)
    low = [t.float() if t.is_floating_point() else t for t in ts]
    dy = torch.randn(T, N, device=DEVICE)
    first = _run(fn, low, grad_idx, dy)
    dev = "cpu" if DEVICE == "cpu" else torch.cuda.get_device_name()
    data = json.loads(path.read_text())
    assert set(data) == {dev} and len(data[dev]) == len(autotune.table()) > 0
    assert all(e["choice"] == ["split", 1, 0] and e["ms"]["split/1"] == 1.0 for e in data[dev].values())
    autotune.clear()  # a new process: the choices come from the file
    timed.clear()
    again = _run(fn, low, grad_idx, dy)
    assert not timed and {r["choice"] for r in autotune.table()} == {"split/1"}
    for a, b in zip(again, first):
        assert torch.equal(a, b)
    path.write_text(json.dumps({"another GPU": data[dev]}))  # not this device's: tuned again, both kept
    autotune.clear()
    _run(fn, low, grad_idx, dy)
    assert timed and set(json.loads(path.read_text())) == {"another GPU", dev}
    path.write_text(json.dumps({"another GPU": data[dev]}))
    old = path.read_text()
    autotune.clear()
    monkeypatch.setattr(autotune.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.warns(UserWarning, match="could not write"):
        _run(fn, low, grad_idx, dy)
    assert path.read_text() == old and [p.name for p in tmp_path.iterdir()] == ["tuned.json"]
    monkeypatch.undo()
    monkeypatch.setenv("MOM_KERNELS_AUTOTUNE", "1")
    monkeypatch.setenv("MOM_KERNELS_AUTOTUNE_CACHE", str(path))
    path.write_text("not a table")
    autotune.clear()
    with pytest.raises(ValueError, match="tuned.json"):
        _run(fn, low, grad_idx, dy)
