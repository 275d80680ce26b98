"""Files read by mom name themselves when they are wrong (empty, truncated, odd-sized, missing keys, torn JSON),
before any training step or write; `prepare` replaces a data folder atomically (a kill at any step leaves the
old data or the new, never a mix) and keeps files it does not own."""
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from mom import data as mdata
from mom.io import FileFormatError, complete_dir
from mom.tokenizer import load_local
from mom.train import RunError, TrainConfig, main, train
from test_hardening_io import Faults, leftovers


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "sample"
    mdata.prepare("sample", str(d), "bpe:512", cache=str(d) + "-cache")
    return str(d)


def copy_data(sample_data, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(sample_data, d)
    return d


def tiny(data, out, **kw):
    base = dict(model="tiny", data=str(data), out_dir=str(out), batch_size=4, max_steps=2, warmup_steps=1,
                eval_interval=2, eval_windows=2, log_interval=1, ckpt_interval=0, progress=False, threads=1,
                model_overrides={"backend": "torch"})
    base.update(kw)
    return TrainConfig(**base)


def _cut(path, n_bytes):
    data = Path(path).read_bytes()
    open(path, "wb").write(data[:n_bytes])


def _edit_meta(d, fn):
    meta = json.load(open(d / "meta.json"))
    fn(meta)
    (d / "meta.json").write_text(json.dumps(meta))


BAD_DATA = [
    ("train-empty", lambda d: open(d / "train.bin", "wb").close(), "train.bin", r"empty file \(0 bytes\)"),
    ("val-odd", lambda d: _cut(d / "val.bin", 2 * 100 + 1), "val.bin", "an odd size"),
    ("train-truncated", lambda d: _cut(d / "train.bin", 2 * 1000), "train.bin",
     "1000 tokens, but .*meta.json says train_tokens="),
    ("meta-torn", lambda d: _cut(d / "meta.json", 40), "meta.json", "not valid JSON"),
    ("meta-empty", lambda d: open(d / "meta.json", "w").close(), "meta.json", "is empty"),
    ("meta-no-vocab", lambda d: _edit_meta(d, lambda m: m.pop("vocab_size")), "meta.json", "has no 'vocab_size'"),
    ("meta-vocab-str", lambda d: _edit_meta(d, lambda m: m.update(vocab_size="512")), "meta.json",
     "'vocab_size' must be int"),
    ("meta-no-tokenizer-name", lambda d: _edit_meta(d, lambda m: m["tokenizer"].pop("name")), "meta.json",
     "tokenizer has no 'name'"),
    ("meta-list", lambda d: (d / "meta.json").write_text("[]"), "meta.json", "must hold a JSON object"),
    ("meta-dtype", lambda d: _edit_meta(d, lambda m: m.update(dtype="uint32")), "meta.json", "uint16 token files"),
]


@pytest.mark.parametrize("name,damage,file,msg", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_files_name_the_file_before_anything_is_written(sample_data, tmp_path, name, damage, file, msg):
    d = copy_data(sample_data, tmp_path)
    damage(d)
    with pytest.raises((FileFormatError, ValueError)) as e:
        train(tiny(d, tmp_path / "out"))
    assert str(d / file) in str(e.value) and re.search(msg, str(e.value)), str(e.value)
    assert not (tmp_path / "out").exists()


def test_token_ids_beyond_the_vocabulary_name_the_file(sample_data, tmp_path):
    d = copy_data(sample_data, tmp_path)
    ids = np.fromfile(d / "val.bin", dtype=np.uint16)
    ids[5] = 600
    ids.tofile(d / "val.bin")
    val = mdata.TokenData(str(d), "val", 64)
    with pytest.raises(FileFormatError, match=r"val\.bin: window 0 holds token id 600 >= vocab_size 512"):
        val.window(0)


def test_data_cli_error_is_one_line(sample_data, tmp_path, capsys):
    d = copy_data(sample_data, tmp_path)
    open(d / "train.bin", "wb").close()
    with pytest.raises(SystemExit) as e:
        main(["--data", str(d), "--out-dir", str(tmp_path / "out"), "--progress", "false"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and str(d / "train.bin") in err, err


def test_bad_tokenizer_files_name_the_file(sample_data, tmp_path):
    d = copy_data(sample_data, tmp_path)
    _cut(d / "tokenizer.json", 100)
    with pytest.raises(FileFormatError, match=r"tokenizer\.json: tokenizer file is not valid JSON"):
        mdata.load_tokenizer(str(d))
    (d / "tokenizer.json").write_text(json.dumps({"type": "byte_bpe", "name": "x", "special": {}}))
    with pytest.raises(FileFormatError, match=r"tokenizer\.json: tokenizer file has no 'merges'"):
        load_local(str(d / "tokenizer.json"))
    (d / "tokenizer.json").write_text(json.dumps({"type": "byte_bpe", "name": "x", "special": {"<|endoftext|>": 7},
                                                   "merges": [], "vocab_size": 257}))
    with pytest.raises(FileFormatError, match=r"tokenizer\.json: broken tokenizer file"):
        load_local(str(d / "tokenizer.json"))


def test_model_and_init_from_files_name_the_path(sample_data, tmp_path):
    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps({"vocab_size": 512, "n_embd": 32, "n_head": 4, "n_bottom": 2,
                               "layer_norm_epsilon": None}))
    with pytest.raises(ValueError, match=r"model\.json: MoMConfig\.layer_norm_epsilon=None"):
        train(tiny(sample_data, tmp_path / "out", model=str(cfg)))
    cfg.write_text('{"vocab_size": 512,')
    with pytest.raises(FileFormatError, match=r"model\.json: model config is not valid JSON"):
        train(tiny(sample_data, tmp_path / "out", model=str(cfg)))
    ck = tmp_path / "ck"
    ck.mkdir()
    open(ck / "model.safetensors", "wb").close()
    with pytest.raises(RunError, match=r"init_from=.*ck/model\.safetensors: weights file is empty"):
        train(tiny(sample_data, tmp_path / "out", init_from=str(ck)))
    assert not (tmp_path / "out").exists()


# --- prepare: atomic data folders ---------------------------------------------------------------------------------
def _fingerprint(folder):
    return {n: Path(os.path.join(folder, n)).read_bytes() for n in ("train.bin", "val.bin", "meta.json",
                                                                       "tokenizer.json")}


def test_prepare_killed_at_every_step_leaves_old_or_new_data(tmp_path):
    cache = str(tmp_path / "cache")
    toks = {}
    for n in (300, 400):  # two tokenizers learned once (the replays then only tokenise: fast)
        mdata.prepare("sample", str(tmp_path / f"tok{n}"), f"bpe:{n}", cache=cache)
        toks[n] = str(tmp_path / f"tok{n}" / "tokenizer.json")
    template = tmp_path / "template"
    mdata.prepare("sample", str(template), toks[300], cache=cache)
    (template / "NOTES.md").write_text("the user's")
    old = _fingerprint(template)
    probe = tmp_path / "probe"
    shutil.copytree(template, probe)
    faults = Faults()
    n = faults.count_ops(lambda: mdata.prepare("sample", str(probe), toks[400], cache=cache))
    new = _fingerprint(probe)
    assert new["meta.json"] != old["meta.json"] and new["train.bin"] != old["train.bin"]
    seen = set()
    for k in range(1, n + 1):
        root = tmp_path / f"k{k}"
        d = root / "data"
        shutil.copytree(template, d)
        faults.kill(k, lambda: mdata.prepare("sample", str(d), toks[400], cache=cache))
        shown = complete_dir(str(d))
        got = _fingerprint(shown)
        which = "old" if got == old else "new" if got == new else None
        assert which, (k, faults.log[-3:])                  # never a train.bin of one and meta.json of another
        seen.add(which)
        assert mdata.TokenData(str(d), "train", 64).n_windows > 0    # readable as is
        assert Path(os.path.join(shown, "NOTES.md")).read_text() == "the user's"
        mdata.prepare("sample", str(d), toks[400], cache=cache)      # the next run tidies up
        assert _fingerprint(d) == new and leftovers(root) == [] and (d / "NOTES.md").exists()
    assert seen == {"old", "new"}


def test_prepare_drops_the_older_writers_temp_files(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for name in ("train.bin.tmp", "meta.json.tmp"):
        (d / name).write_bytes(b"torn")
    mdata.prepare("sample", str(d), "bpe:300", cache=str(tmp_path / "cache"))
    assert sorted(os.listdir(d)) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
