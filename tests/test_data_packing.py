"""Packing: token shards round-trip to the tokenizer's ids, counts reconcile, malformed lines are counted."""

import gzip
import json

import numpy as np
import pytest

from gemmalab.data.corpus import math_documents
from gemmalab.data.mixture import Mixture, Stage
from gemmalab.data.packing import pack, read_meta
from gemmalab.errors import GemmalabError
from gemmalab.tokenizer import train_tokenizer

TEXTS = [
    ("web", "The quick brown fox jumps over the lazy dog.\n\nA second paragraph, with  two spaces."),
    ("code", "def f(x):\n    return x * 2  # doubled\n\n\nclass A:\n\tpass\n"),
    ("math", "Problem: What is 12 * 34?\n\nAnswer: 408\n"),
    ("web", "Unicode: café, naïve, 東京, emoji 🙂 and control-token text <start_of_turn>user kept as text."),
    ("code", "x = [i ** 2 for i in range(10)]\nprint(x)\n"),
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train = d / "train.jsonl"
    with open(train, "w", encoding="utf-8") as fh:
        for doc in math_documents(200, seed=3):
            fh.write(json.dumps(doc) + "\n")
        for _, text in TEXTS:
            fh.write(json.dumps({"text": text}) + "\n")
    return train_tokenizer([train], 400, d / "model")


def _doc(i, source, text):
    return json.dumps({"id": f"d{i}", "text": text, "metadata": {"source": source}}, ensure_ascii=False)


def _shard_docs(folder, meta):
    """(tokens, source name) of every document in a packed folder, in order."""
    out = []
    for s in meta.shards:
        toks = np.fromfile(folder / s.tokens, dtype="<u4")
        assert toks.size == s.num_tokens
        index = np.load(folder / s.index)
        assert index.shape == (s.num_docs, 3) and index[:, 1].sum() == s.num_tokens
        for start, length, src in index:
            out.append((toks[start:start + length].tolist(), meta.source_names[src]))
    return out


def test_round_trip_and_counts(tok, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.jsonl").write_text("\n".join(_doc(i, s, t) for i, (s, t) in enumerate(TEXTS[:3])) + "\n", encoding="utf-8")
    with gzip.open(docs / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(_doc(i, s, t) for i, (s, t) in enumerate(TEXTS[3:], 3)) + "\n")
    meta = pack(docs, tok, tmp_path / "shards", seq_len=128, shard_tokens=60, progress=False)
    assert read_meta(tmp_path / "shards") == meta
    assert meta.tokenizer_fingerprint == tok.fingerprint() and meta.vocab_size == tok.vocab_size
    assert meta.seq_len == 128 and len(meta.shards) > 1  # small shard_tokens forces several shards
    packed = _shard_docs(tmp_path / "shards", meta)
    assert len(packed) == len(TEXTS) == meta.num_docs
    for (ids, source), (want_source, text) in zip(packed, TEXTS):
        assert source == want_source
        assert ids == [tok.bos_id] + tok.encode(text, bos=False, parse_special=False) + [tok.eos_id]
        assert tok.decode(ids[1:-1]) == text
    assert meta.num_tokens == sum(len(ids) for ids, _ in packed)
    for name in ("web", "code", "math"):
        assert meta.sources[name] == {"docs": sum(1 for _, s in packed if s == name),
                                      "tokens": sum(len(i) for i, s in packed if s == name)}
    assert meta.malformed == meta.empty == meta.blank == 0 and meta.lines == len(TEXTS)


def test_malformed_lines_counted_not_fatal(tok, tmp_path, caplog):
    lines = [_doc(0, "web", "fine"), "not json", "", '{"text": 5}', '["a list"]', _doc(1, "web", ""),
             '{"id": "x", "text": "no metadata"}', '{"text": "bad source", "metadata": {"source": 3}}',
             _doc(2, "math", "1 + 1 = 2")]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta = pack([path], tok, tmp_path / "out", progress=False)
    assert meta.lines == len(lines)
    assert (meta.num_docs, meta.malformed, meta.empty, meta.blank) == (3, 4, 1, 1)
    assert meta.lines == meta.num_docs + meta.malformed + meta.empty + meta.blank
    assert meta.sources["unknown"]["docs"] == 1  # no metadata.source: kept, labelled "unknown"
    assert [e.split(": ", 1)[0] for e in meta.malformed_examples] == [f"{path}:{n}" for n in (2, 4, 5, 8)]
    assert meta.inputs[0]["malformed"] == 4
    assert "4 malformed line(s)" in caplog.text


def test_truncated_gzip_is_reported(tok, tmp_path):
    good = tmp_path / "full.jsonl.gz"
    with gzip.open(good, "wt", encoding="utf-8") as fh:
        for i in range(200):
            fh.write(_doc(i, "web", f"document number {i} " * 20) + "\n")
    cut = tmp_path / "in" / "cut.jsonl.gz"
    cut.parent.mkdir()
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    meta = pack(cut.parent, tok, tmp_path / "out", progress=False)
    assert meta.unreadable == 1 and 0 < meta.num_docs < 200
    assert "cannot be read to the end" in meta.malformed_examples[-1]


def test_repack_replaces_stale_shards(tok, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(_doc(i, s, t) for i, (s, t) in enumerate(TEXTS)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    first = pack(path, tok, out, shard_tokens=40, progress=False)
    first_docs = _shard_docs(out, first)
    second = pack(path, tok, out, shard_tokens=10**6, progress=False)
    assert len(first.shards) > 1 and len(second.shards) == 1
    assert sorted(p.name for p in out.iterdir()) == ["index-00000.npy", "meta.json", "tokens-00000.bin"]
    assert _shard_docs(out, second) == first_docs


def test_errors_name_the_problem(tok, tmp_path):
    with pytest.raises(GemmalabError, match="does not exist"):
        pack(tmp_path / "missing.jsonl", tok, tmp_path / "out")
    with pytest.raises(GemmalabError, match="not a packed token shard folder"):
        read_meta(tmp_path)


def test_mixture_validation_and_schedule():
    m = Mixture([Stage(0.9, {"web": 3, "code": 1}), Stage(1.0, {"web": 1, "math": 1, "code": 0})])
    assert m.weights_at(0, 1000) == {"web": 0.75, "code": 0.25}
    assert m.weights_at(899, 1000) == {"web": 0.75, "code": 0.25}
    assert m.weights_at(900, 1000) == {"web": 0.5, "math": 0.5}
    assert m.weights_at(5000, 1000) == {"web": 0.5, "math": 0.5}  # past the end: the last stage
    assert Mixture.from_dict(m.to_dict()) == m
    m.check_sources(["web", "code", "math"])
    with pytest.raises(GemmalabError, match=r"names source\(s\) \['math'\]"):
        m.check_sources(["web", "code"])
    with pytest.raises(GemmalabError, match="until = 1.0"):
        Mixture([Stage(0.5, {"web": 1})])
    with pytest.raises(GemmalabError, match="larger than the previous"):
        Mixture([Stage(0.5, {"web": 1}), Stage(0.5, {"web": 1}), Stage(1.0, {"web": 1})])
    with pytest.raises(GemmalabError, match="'web' must be a finite number >= 0"):
        Stage(1.0, {"web": -1})
    with pytest.raises(GemmalabError, match="at least one weight must be positive"):
        Stage(1.0, {"web": 0})
    with pytest.raises(GemmalabError, match="exactly the fields"):
        Mixture.from_dict({"stages": [{"until": 1.0, "weight": {"web": 1}}]})
