"""Built-in corpus: deterministic, labelled by source, sane sizes, correct worked math."""

import gzip
import json
import re
from fractions import Fraction

import pytest

from gemmalab.data.corpus import SOURCES, math_documents, stdlib_files, write_builtin_corpus
from gemmalab.errors import GemmalabError


def _read(path):
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return write_builtin_corpus(out, seed=1, math_problems=300, max_files=40)


def test_deterministic(corpus, tmp_path):
    again = write_builtin_corpus(tmp_path, seed=1, math_problems=300, max_files=40)
    assert [p.name for p in again] == [f"{s}.jsonl.gz" for s in SOURCES]
    for a, b in zip(corpus, again):
        assert a.read_bytes() == b.read_bytes(), a.name
    other = write_builtin_corpus(tmp_path / "seed2", seed=2, math_problems=300, sources=["math"])
    assert other[0].read_bytes() != corpus[2].read_bytes()


def test_labels_ids_and_sizes(corpus):
    ids = set()
    for path, source in zip(corpus, SOURCES):
        docs = _read(path)
        assert docs and all(d["metadata"]["source"] == source for d in docs)
        assert all(isinstance(d["text"], str) and d["text"].strip() for d in docs)
        ids.update(d["id"] for d in docs)
        if source == "web":
            names = {d["id"] for d in docs}
            assert "web/pydoc-topic/if" in names  # the language reference topics
            assert len(docs) >= 80 and sum(len(d["text"]) for d in docs) > 300_000
        elif source == "code":
            assert len(docs) >= 10
            assert all(d["id"] == f"code/{d['metadata']['path']}" for d in docs)
            assert not any("/test/" in d["id"] or "test_" in d["id"] for d in docs)
        else:
            assert len(docs) == 300
    assert len(ids) == sum(len(_read(p)) for p in corpus)  # ids are unique across sources


def test_stdlib_selection_skips_tests_and_generated():
    files = [rel for rel, _ in stdlib_files()]
    assert "os.py" in files and "json/__init__.py" in files
    assert not any(rel.startswith(("test/", "encodings/", "pydoc_data/")) or "/test" in rel for rel in files)
    assert files == sorted(files)


def test_math_answers_are_right():
    docs = list(math_documents(400, seed=7))
    kinds = {d["metadata"]["generator"] for d in docs}
    assert {"linear", "quadratic", "system", "fractions", "long_multiplication"} <= kinds
    for d in docs:
        text, gen = d["text"], d["metadata"]["generator"]
        assert text.startswith("Problem: ") and "\nSolution:\n" in text and "\nAnswer: " in text
        answer = text.rsplit("Answer: ", 1)[1].strip()
        if gen == "long_multiplication":
            a, b = map(int, re.search(r"What is (\d+) \* (\d+)\?", text).groups())
            assert int(answer) == a * b
        elif gen == "fractions":
            a, b, op, c, e = re.search(r"Simplify (\d+)/(\d+) ([+-]) (\d+)/(\d+)\.", text).groups()
            want = Fraction(int(a), int(b)) + (1 if op == "+" else -1) * Fraction(int(c), int(e))
            assert Fraction(answer) == want
        elif gen == "order_of_operations":
            expr = re.search(r"Evaluate (.+)\.\n", text).group(1)
            assert int(answer) == eval(expr.replace("/", "//"))


def test_rejects_unknown_source(tmp_path):
    with pytest.raises(GemmalabError, match="unknown built-in corpus source"):
        write_builtin_corpus(tmp_path, sources=["books"])
