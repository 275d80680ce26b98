"""Checkpoints survive a kill at every step of a save: save_pretrained and mom.train's checkpoint rotation
leave the old or the new checkpoint, the next run tidies every leftover, and `--resume` then logs exactly
the losses of an uninterrupted run. Kills are injected in-process at every file-system operation
(test_hardening_io.Faults) and, for a training run, with a real SIGKILL in a subprocess. Shipped sample data,
tiny preset, fp32 CPU."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import small_config
from mom import MoMForCausalLM
from mom import data as mdata
from mom import train as mtrain
from mom.io import FileFormatError, complete_dir
from mom.train import TrainConfig, train
from test_hardening_io import Faults, leftovers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT_FILES = ("config.json", "model.safetensors", "optimizer.pt", "train_state.json")


def _digest(folder, names):
    return {n: hashlib.sha256(Path(os.path.join(folder, n)).read_bytes()).hexdigest() for n in names}


# --- save_pretrained ------------------------------------------------------------------------------------------------
def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_pretrained_killed_at_every_step(tmp_path):
    cfg = small_config(backend="torch")
    old, new = MoMForCausalLM(cfg), MoMForCausalLM(cfg)
    assert not _same_weights(old, new)
    faults = Faults()
    probe = tmp_path / "probe"
    old.save_pretrained(str(probe))
    n = faults.count_ops(lambda: new.save_pretrained(str(probe)))
    seen = set()
    for k in range(1, n + 1):
        root = tmp_path / f"k{k}"
        d = root / "model"
        old.save_pretrained(str(d))
        (d / "README.md").write_text("the user's notes")     # not ours: kept through every save
        faults.kill(k, lambda: new.save_pretrained(str(d)))
        loaded = MoMForCausalLM.from_pretrained(str(d))         # read-only: loads in every state
        which = "old" if _same_weights(loaded, old) else "new" if _same_weights(loaded, new) else None
        assert which, (k, faults.log)
        seen.add(which)
        assert Path(os.path.join(complete_dir(str(d)), "README.md")).read_text() == "the user's notes"
        new.save_pretrained(str(d))                             # the next save tidies up and succeeds
        assert _same_weights(MoMForCausalLM.from_pretrained(str(d)), new)
        assert leftovers(root) == [] and sorted(os.listdir(d)) == ["README.md", "config.json", "model.safetensors"]
    assert seen == {"old", "new"}, seen


def test_first_save_pretrained_killed_leaves_nothing_half_written(tmp_path):
    model = MoMForCausalLM(small_config(backend="torch"))
    faults = Faults()
    n = faults.count_ops(lambda: model.save_pretrained(str(tmp_path / "probe")))
    for k in range(1, n + 1):
        d = tmp_path / f"k{k}" / "m"
        faults.kill(k, lambda: model.save_pretrained(str(d)))
        if complete_dir(str(d)) is None:                         # nothing there yet: a clear "not found"
            with pytest.raises(FileNotFoundError, match=str(d)):
                MoMForCausalLM.from_pretrained(str(d))
        else:                                                    # or the complete new one
            assert _same_weights(MoMForCausalLM.from_pretrained(str(d)), model)


# --- training checkpoints ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "sample"
    mdata.prepare("sample", str(d), "bpe:512", cache=str(d) + "-cache")
    return str(d)


def tiny(data, out, **kw) -> TrainConfig:
    base = dict(model="tiny", data=data, out_dir=str(out), batch_size=4, max_steps=6, warmup_steps=2, lr=3e-3,
                eval_interval=3, eval_windows=4, log_interval=1, ckpt_interval=2, progress=False, threads=1,
                model_overrides={"backend": "torch"})
    base.update(kw)
    return TrainConfig(**base)


def rows(out, key):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r[key]) for r in map(json.loads, f) if key in r]


def assert_same_losses(a, b):
    for key in ("loss", "aux_loss", "val_loss"):
        assert rows(a, key) == rows(b, key), key  # exact on CPU fp32: same batches, same optimiser state


@pytest.fixture(scope="module")
def straight(sample_data, tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at 2, 4, 6). Its save at step 4 is also replayed, killed at
    every file-system operation, into copies of the run folder as it was just before that save."""
    base = tmp_path_factory.mktemp("ckpt-kills")
    out = base / "straight"
    real = mtrain.save_checkpoint
    faults = Faults()
    killed = []

    def save(out_dir, model, optimizer, tc, cfg, state, d):
        if state["step"] == 4:
            template = base / "before-4"
            shutil.copytree(out_dir, template)
            probe = base / "probe"
            shutil.copytree(template, probe)
            n = faults.count_ops(lambda: real(str(probe), model, optimizer, tc, cfg, state, d))
            for k in range(1, n + 1):
                dk = base / f"k{k}"
                shutil.copytree(template, dk)
                faults.kill(k, lambda: real(str(dk), model, optimizer, tc, cfg, state, d))
                killed.append((k, str(dk), list(faults.log)))
        real(out_dir, model, optimizer, tc, cfg, state, d)
        if state["step"] in (2, 4):
            shutil.copytree(os.path.join(out_dir, "ckpt"), base / f"ckpt{state['step']}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mtrain, "save_checkpoint", save)
        train(tiny(sample_data, out))
    return {"out": str(out), "killed": killed, "ckpt2": str(base / "ckpt2"), "ckpt4": str(base / "ckpt4")}


def test_checkpoint_rotation_killed_at_every_step_then_resume(straight, sample_data):
    old, new = _digest(straight["ckpt2"], CKPT_FILES), _digest(straight["ckpt4"], CKPT_FILES)
    assert len(straight["killed"]) >= 10
    by_outcome = {}
    for k, dk, log in straight["killed"]:
        shown = complete_dir(os.path.join(dk, "ckpt"))           # what a reader sees, before any recovery
        got = _digest(shown, CKPT_FILES)
        outcome = "old" if got == old else "new" if got == new else None
        assert outcome, (k, log)
        mtrain._recover(dk)                                       # the next run's first step
        assert leftovers(dk) == [] and _digest(os.path.join(dk, "ckpt"), CKPT_FILES) == got, (k, log)
        by_outcome.setdefault(outcome, dk)
    assert set(by_outcome) == {"old", "new"}
    for outcome, dk in by_outcome.items():                     # resume from each: the uninterrupted run's losses
        train(tiny(sample_data, dk, resume=True))
        assert_same_losses(straight["out"], dk)


_KILLER = r"""
import json, os, signal, sys
moment, cfg = sys.argv[1], json.loads(sys.argv[2])
real = os.replace
def replace(src, dst, *a, **k):
    real(src, dst, *a, **k)
    parent, base = os.path.split(str(dst))
    if moment == "between_renames" and base == ".ckpt.old":
        os.kill(os.getpid(), signal.SIGKILL)          # ckpt/ renamed away, the new one not yet in place
    if moment == "deleting_old" and base == "ckpt" and os.path.isdir(os.path.join(parent, ".ckpt.old")):
        os.unlink(os.path.join(parent, ".ckpt.old", "model.safetensors"))
        os.kill(os.getpid(), signal.SIGKILL)          # new ckpt/ in place, the old one half deleted
os.replace = replace
from mom.train import TrainConfig, train
train(TrainConfig(**cfg))
"""


@pytest.mark.parametrize("moment", ["between_renames", "deleting_old"])
def test_sigkill_during_checkpoint_rotation_then_resume(straight, sample_data, tmp_path, moment):
    out = tmp_path / "run"
    cfg = vars(tiny(sample_data, out))
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _KILLER, moment, json.dumps(cfg)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert leftovers(out) == ([".ckpt.new", ".ckpt.old"] if moment == "between_renames" else [".ckpt.old"])
    train(tiny(sample_data, out, resume=True))     # recovers, then its checkpoints at 6 rotate cleanly
    assert_same_losses(straight["out"], out)
    assert leftovers(out) == [] and json.load(open(out / "ckpt" / "train_state.json"))["step"] == 6


def test_torn_metrics_line_is_dropped_on_resume(straight, sample_data, tmp_path):
    out = tmp_path / "run"
    train(tiny(sample_data, out, stop_after=3))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "tokens": 1024, "lr": 0.0')      # killed mid-line
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: dropped a torn last line"):
        train(tiny(sample_data, out, resume=True))
    assert_same_losses(straight["out"], out)


def test_killed_before_first_checkpoint_resumes_from_zero(straight, sample_data, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        def die(*a, **k):
            raise KeyboardInterrupt("killed")
        mp.setattr(mtrain, "save_checkpoint", die)
        with pytest.raises(KeyboardInterrupt):
            train(tiny(sample_data, out))
    assert os.path.exists(out / "run.json") and not os.path.exists(out / "ckpt")
    train(tiny(sample_data, out, resume=True))
    assert "no checkpoint yet" in capsys.readouterr().err
    assert_same_losses(straight["out"], out)


def test_older_writer_leftovers_are_recovered(straight, sample_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(os.path.dirname(straight["ckpt2"]) + "/before-4", out)  # ckpt at step 2, metrics to 4
    os.replace(out / "ckpt", out / ".ckpt-old")          # the old writer, killed between its renames
    os.makedirs(out / ".ckpt-tmp")                       # and its half-written temp folder
    (out / ".ckpt-tmp" / "config.json").write_text("{")
    train(tiny(sample_data, out, resume=True))
    assert_same_losses(straight["out"], out)
    assert not os.path.exists(out / ".ckpt-old") and not os.path.exists(out / ".ckpt-tmp")


# --- damaged checkpoint files: errors name the file, nothing is written ---------------------------------------------
def _damaged_run(straight, tmp_path, name, damage):
    out = tmp_path / name
    shutil.copytree(os.path.dirname(straight["ckpt2"]) + "/before-4", out)
    damage(out / "ckpt")
    before = {p: Path(os.path.join(out, p)).read_bytes() for p in ("run.json", "metrics.jsonl")}
    return out, before


def _truncate(path):
    data = Path(path).read_bytes()
    open(path, "wb").write(data[: len(data) // 2])


@pytest.mark.parametrize("name,damage,match", [
    ("state-json", lambda c: (c / "train_state.json").write_text('{"step": 2, "tok'),
     r"train_state\.json: checkpoint train_state\.json is not valid JSON"),
    ("state-keys", lambda c: (c / "train_state.json").write_text('{"tokens": 10}'),
     r"train_state\.json: train_state\.json has no 'step'"),
    ("weights-torn", lambda c: _truncate(c / "model.safetensors"), r"model\.safetensors: weights file is not a "
                                                                      r"readable safetensors"),
    ("weights-empty", lambda c: open(c / "model.safetensors", "wb").close(), r"model\.safetensors: weights file is "
                                                                              r"empty"),
    ("optimizer-torn", lambda c: _truncate(c / "optimizer.pt"), r"optimizer\.pt: optimizer state cannot be read"),
    ("optimizer-missing", lambda c: os.unlink(c / "optimizer.pt"), r"optimizer\.pt: optimizer state not found"),
])
def test_damaged_checkpoint_names_the_file_and_writes_nothing(straight, sample_data, tmp_path, name, damage, match):
    out, before = _damaged_run(straight, tmp_path, name, damage)
    with pytest.raises((FileFormatError, FileNotFoundError), match=match) as e:
        train(tiny(sample_data, out, resume=True))
    assert str(out / "ckpt") in str(e.value)
    assert {p: Path(os.path.join(out, p)).read_bytes() for p in before} == before


def test_from_pretrained_bad_files_name_the_path(tmp_path):
    d = tmp_path / "m"
    MoMForCausalLM(small_config(backend="torch")).save_pretrained(str(d))
    cfg = json.load(open(d / "config.json"))
    (d / "config.json").write_text(json.dumps({**cfg, "layer_norm_epsilon": "1e-5"}))
    with pytest.raises(ValueError, match=r"m/config\.json: MoMConfig\.layer_norm_epsilon='1e-5': must be a finite"):
        MoMForCausalLM.from_pretrained(str(d))
    (d / "config.json").write_text(json.dumps({**cfg, "n_embd": None}))
    with pytest.raises(ValueError, match=r"config\.json: MoMConfig\.n_embd=None: must be an int"):
        MoMForCausalLM.from_pretrained(str(d))
    (d / "config.json").write_text(json.dumps(cfg)[:-5])
    with pytest.raises(FileFormatError, match=r"config\.json: model config is not valid JSON"):
        MoMForCausalLM.from_pretrained(str(d))
    (d / "config.json").write_text(json.dumps({**cfg, "n_top": 0, "n_bottom": 2}))
    with pytest.raises(FileFormatError, match=r"model\.safetensors does not fit .*config\.json"):
        MoMForCausalLM.from_pretrained(str(d))
    (d / "config.json").write_text(json.dumps(cfg))
    _truncate(d / "model.safetensors")
    with pytest.raises(FileFormatError, match=str(d / "model.safetensors")):
        MoMForCausalLM.from_pretrained(str(d))
