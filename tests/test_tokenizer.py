"""mom.tokenizer runs on Hugging Face `tokenizers`: local BPEs trained and applied by it in our id layout,
GPT-2's files read by it (same ids as OpenAI's), and the hand-written merge loop gone."""
import json
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from mom import data as mdata
from mom import tokenizer as mtok
from mom.io import FileFormatError
from mom.tokenizer import EOT, ByteBPE, bytes_to_unicode, load_gpt2, train_bpe

SAMPLE = Path(mdata.SAMPLE_TEXT).read_text(encoding="utf-8")


def test_local_bpe_is_a_tokenizers_tokenizer_in_our_id_layout():
    tok = train_bpe([SAMPLE], 300)
    assert isinstance(tok.tokenizer, Tokenizer)
    assert tok.vocab_size == 300 and tok.eot_id == 299 and len(tok.merges) == 299 - 256
    for i, (a, b) in enumerate(tok.merges):       # every merge joins ids defined before it
        assert 0 <= a < 256 + i and 0 <= b < 256 + i
    assert tok.encode("A") == [ord("A")]          # ids 0..255 are the bytes
    assert tok.encode("é") == list("é".encode())  # (no merge of these two bytes in the sample)
    assert tok.encode_batch(["to be", "or not"]) == [tok.encode("to be"), tok.encode("or not")]


def test_endoftext_in_text_is_plain_text():
    tok = train_bpe([SAMPLE], 300)
    ids = tok.encode("a" + EOT + "b")
    assert tok.eot_id not in ids and tok.decode(ids) == "a" + EOT + "b"
    assert tok.decode([tok.eot_id]) == EOT


def test_no_hand_written_bpe_left():
    src = Path(mtok.__file__).read_text(encoding="utf-8")
    for gone in ("def _bpe", "ranked", "Counter", "import regex"):
        assert gone not in src


def _mini_gpt2_files(tmp_path, merges):
    """OpenAI's format: encoder.json (token -> id: the 256 byte characters in byte order, the merges' products,
    <|endoftext|> last) and vocab.bpe ("#version" then one merge per line)."""
    chars = bytes_to_unicode()
    enc = {chars[b]: b for b in range(256)}
    for a, b in merges:
        enc[a + b] = len(enc)
    enc[EOT] = len(enc)
    (tmp_path / "encoder.json").write_text(json.dumps(enc), encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return str(tmp_path / "encoder.json"), str(tmp_path / "vocab.bpe"), enc


def test_gpt2_format_lowest_rank_first_and_space_marker(tmp_path):
    enc_json, bpe, enc = _mini_gpt2_files(tmp_path, [("a", "b"), ("b", "c"), ("Ġ", "ab")])
    tok = load_gpt2(enc_json, bpe)
    assert tok.vocab_size == 260 and tok.eot_id == 259 and tok.name == "gpt2"
    assert tok.encode("abc") == [enc["ab"], ord("c")]       # (a, b) ranks before (b, c)
    assert tok.encode("bc") == [enc["bc"]]
    assert tok.encode("x abc") == [ord("x"), enc["Ġab"], ord("c")]
    assert tok.decode(tok.encode("x abc\n\t é")) == "x abc\n\t é"
    from tokenizers import ByteLevelBPETokenizer

    ref = ByteLevelBPETokenizer(enc_json, bpe)
    for text in ("abc abcab", SAMPLE[:500]):
        assert tok.encode(text) == ref.encode(text).ids


def test_gpt2_files_errors_name_the_file(tmp_path):
    enc_json, bpe, _ = _mini_gpt2_files(tmp_path, [("a", "b")])
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na b c\n")
    with pytest.raises(FileFormatError, match=r"vocab.bpe: not GPT-2.s vocab.bpe \(a merge line without exactly"):
        load_gpt2(enc_json, bpe)
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na \x00\n")
    with pytest.raises(FileFormatError, match=r"vocab.bpe: not GPT-2's vocab.bpe \(character"):
        load_gpt2(enc_json, bpe)
    (tmp_path / "encoder.json").write_text(json.dumps({"a": 0, "b": 5}))
    with pytest.raises(FileFormatError, match="encoder.json: not GPT-2's encoder.json"):
        load_gpt2(enc_json, bpe)
    with pytest.raises(FileNotFoundError, match="vocab.bpe not found"):
        load_gpt2(enc_json, str(tmp_path / "missing.bpe"))


GPT2_CACHE = os.path.join(mdata.DEFAULT_CACHE, "gpt2-tokenizer")


@pytest.mark.skipif(not os.path.isfile(os.path.join(GPT2_CACHE, "vocab.bpe")),
                    reason="GPT-2 tokenizer files not cached (python -m mom.data --tokenizer gpt2 fetches them)")
def test_gpt2_real_files_known_ids():
    tok = load_gpt2(os.path.join(GPT2_CACHE, "encoder.json"), os.path.join(GPT2_CACHE, "vocab.bpe"))
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" " + EOT) != [tok.eot_id]
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE


def test_bytebpe_from_merge_ids_rejects_forward_references():
    with pytest.raises(ValueError, match="refers to an id not defined before it"):
        ByteBPE.from_merge_ids([[0, 300]], {EOT: 257}, "t")


def test_local_tokenizer_file_round_trip_and_vocab_size_check(tmp_path):
    """save -> load_local gives the same ids; a file whose vocab_size does not match the tokens its merges and
    specials rebuild is refused, naming the file (a merge list cut short would otherwise shift the ids)."""
    tok = train_bpe([SAMPLE], 300)
    path = tmp_path / "t.json"
    tok.save(path)
    back = mtok.load_local(str(path))
    assert back.vocab_size == 300 and back.eot_id == 299 and back.encode(SAMPLE[:500]) == tok.encode(SAMPLE[:500])
    d = json.loads(path.read_text())
    d["merges"], d["special"] = d["merges"][:-1], {EOT: 298}      # one merge lost, vocab_size still 300
    path.write_text(json.dumps(d))
    with pytest.raises(FileFormatError, match=r"t\.json: vocab_size 300 but 299 tokens rebuilt"):
        mtok.load_local(str(path))
