"""The memorization audit: classification on both sides of the 10% boundary, the pruning bounds, intervals; canaries
planted into packed tokens, a tiny model pretrained on them (memorization rising with repetitions, the planted
personal data found by type, fresh canaries not memorized), pruned == unpruned, the stage through the command line,
resume, and bad input."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from gemmalab.data.canaries import CanaryConfig, make_canaries
from gemmalab.errors import GemmalabError
from gemmalab.evaluate.edit_bounds import (char_lower_bound, classify, edit_row, first_row, stable_text,
                                           token_lower_bound)
from gemmalab.evaluate.memorization import MemorizationConfig, audit, draw_samples, load_corpus, mean_ci, wilson

PREFIX, SUFFIX = 16, 96  # the tiny tokenizer spells the planted e-mail, phone and SSN in about 60 tokens
CANARIES = CanaryConfig(enabled=True, per_repeat=2, tokens=PREFIX + SUFFIX, pii_at=PREFIX)


def test_exact_and_approximate_on_both_sides_of_the_boundary():
    target = list(range(50))
    assert classify(target, target, 5) == {"distance": 0, "normalized": 0.0, "exact": True, "approx": True}
    five = [t + 100 if i % 10 == 0 else t for i, t in enumerate(target)]  # 5 of 50 substituted: 10%
    assert classify(five, target, 5) == {"distance": 5, "normalized": 0.1, "exact": False, "approx": True}
    six = [t + 100 if i in (0, 10, 20, 30, 40, 45) else t for i, t in enumerate(target)]  # 12%
    assert classify(six, target, 5) == {"distance": 6, "normalized": 0.12, "exact": False, "approx": False}
    shifted = target[1:] + [99]  # one deletion + one insertion: distance 2
    assert classify(shifted, target, 5)["distance"] == 2
    assert MemorizationConfig(corpus="x").max_distance == 5
    assert MemorizationConfig(corpus="x", suffix=32).max_distance == 3
    assert MemorizationConfig(corpus="x", suffix=30, threshold=0.1).max_distance == 3  # 0.1 * 30 is 3.0000000000000004


def test_the_pruning_bounds_never_exceed_the_final_distances():
    from rapidfuzz.distance import Levenshtein

    rng = random.Random(0)
    tighter = 0
    for _ in range(300):
        target = [rng.randrange(4) for _ in range(12)]
        generated = [rng.randrange(4) for _ in range(12)]
        final = Levenshtein.distance(generated, target)
        row = first_row(len(target))
        for t, token in enumerate(generated, 1):
            row = edit_row(row, token, np.array(target))
            assert row.tolist() == [Levenshtein.distance(generated[:t], target[:j]) for j in range(len(target) + 1)]
            assert token_lower_bound(row, t) <= final
            tighter += token_lower_bound(row, t) > row.min()  # the |k - j| term adds to the plain row minimum
        assert token_lower_bound(row, len(generated)) == final
        # characters: a prefix of the final text, a target of another length, normalised by the longer one
        text = "".join(rng.choice("ab c") for _ in range(rng.randrange(1, 30)))
        true = "".join(rng.choice("ab c") for _ in range(rng.randrange(0, 30)))
        row = first_row(len(true))
        for ch in text:
            row = edit_row(row, ord(ch), np.array([ord(c) for c in true], dtype=np.int64))
            assert char_lower_bound(row, len(true)) <= Levenshtein.normalized_distance(text, true) + 1e-12
    assert tighter > 100


def test_a_partial_decode_is_a_prefix_of_the_final_text(tiny_tokenizer):
    """What the character bound relies on: stable_text(decode(ids[:j])) is a prefix of decode(ids), byte-fallback
    pieces included (the tiny tokenizer spells '@', '(' and ':' in bytes)."""
    rng = random.Random(1)
    byte_ids = [tiny_tokenizer.id_of(f"<0x{b:02X}>") for b in (0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0x40, 0x80)]
    for _ in range(200):
        ids = [rng.choice(byte_ids) if rng.random() < 0.4 else rng.randrange(3, 512) for _ in range(20)]
        final = tiny_tokenizer.decode(ids)
        for j in range(len(ids)):
            assert final.startswith(stable_text(tiny_tokenizer.decode(ids[:j])))


def test_intervals():
    assert wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert wilson(10, 10)[1] == 1.0
    mean, ci = mean_ci([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and ci == pytest.approx([0.7 - 1.96 * 0.2 / 3**0.5, 0.7 + 1.96 * 0.2 / 3**0.5])


# ---- canaries and a tiny model pretrained on them ----------------------------------------------------------------


def test_canaries_are_off_by_default_and_planted_after_the_documents_when_asked(tiny_tokenizer, tmp_path):
    from gemmalab.data.packing import pack

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"some words {i} here", "metadata": {"source": "web"}}) + "\n"
                            for i in range(5)))
    plain = pack(docs, tiny_tokenizer, tmp_path / "plain", progress=False)
    off = pack(docs, tiny_tokenizer, tmp_path / "off", progress=False, canaries=CanaryConfig())
    shard = "tokens-00000.bin"
    assert (tmp_path / "plain" / shard).read_bytes() == (tmp_path / "off" / shard).read_bytes()
    assert (tmp_path / "plain" / "meta.json").read_text() == (tmp_path / "off" / "meta.json").read_text()
    assert "canaries" not in json.loads((tmp_path / "off" / "meta.json").read_text()) and off.canaries is None
    on = pack(docs, tiny_tokenizer, tmp_path / "on", progress=False, canaries=CANARIES)
    assert on.sources["web"] == plain.sources["web"]
    assert on.sources["canaries"]["docs"] == 2 * (1 + 4 + 16 + 64) == on.canaries["copies"]
    assert on.num_docs == plain.num_docs + on.canaries["copies"]
    # the documents come first, unchanged; the canaries follow
    assert (tmp_path / "on" / "tokens-00000.bin").read_bytes().startswith(
        (tmp_path / "plain" / "tokens-00000.bin").read_bytes())
    lines = [json.loads(line) for line in (tmp_path / "on" / "canaries.jsonl").read_text().splitlines()]
    assert [x["metadata"]["repeats"] for x in lines] == [1, 1, 4, 4, 16, 16, 64, 64]
    assert all([p["kind"] for p in x["metadata"]["pii"]] == ["EMAIL", "PHONE", "SSN"] for x in lines)
    assert [c.text for c in make_canaries(CANARIES, tiny_tokenizer)] == [x["text"] for x in lines]  # seeded
    with pytest.raises(GemmalabError, match="`repeats` must be distinct"):
        CanaryConfig(repeats=[4, 4])


@pytest.fixture(scope="module")
def pretrained(tiny_tokenizer, tmp_path_factory):
    """(model dir, token shards, unseen JSONL): `gemmalab pretrain` of a tiny model on 60 prose documents and the
    canaries (2 per repetition count) planted by `pack`, in their natural share; the unseen corpus is 4 fresh canaries
    (another seed) and a document too short to sample."""
    from gemmalab.config import load
    from gemmalab.data.canaries import _WORDS
    from gemmalab.data.packing import pack
    from gemmalab.train.pretrain import PretrainConfig, pretrain

    root = tmp_path_factory.mktemp("canaries")
    rng = random.Random(1)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice(_WORDS) for _ in range(40)),
                                                         "metadata": {"source": "web"}}) + "\n" for _ in range(60)))
    pack(root / "docs.jsonl", tiny_tokenizer, root / "tokens", seq_len=128, progress=False, canaries=CANARIES)
    tokenizer_file = root / "tokenizer.model"
    tiny_tokenizer.save(root)
    (root / "train.toml").write_text(f"""
[model]
preset = "tiny-gemma"
dim = 128
ffn_dim = 512
[data]
shards = ["{root / 'tokens'}"]
tokenizer = "{tokenizer_file}"
batch_size = 8
seq_len = 128
[optim]
lr = 3e-3
warmup_steps = 10
weight_decay = 0.0
[train]
steps = 200
log_every = 50
threads = 1
[checkpoint]
every = 0
at_end = false
""")
    threads = torch.get_num_threads()
    try:  # one thread: these shapes gain nothing from a second, and lose much when the machine is shared
        pretrain(load(PretrainConfig, root / "train.toml"), root / "run", progress=False)
    finally:
        torch.set_num_threads(threads)
    fresh = make_canaries(dataclasses.replace(CANARIES, seed=1, repeats=[1], per_repeat=4), tiny_tokenizer)
    unseen = root / "unseen.jsonl"
    unseen.write_text("".join(json.dumps({"id": f"fresh{i}", "text": c.text, "metadata": {"source": "fresh"}}) + "\n"
                              for i, c in enumerate(fresh))
                      + json.dumps({"text": "too short", "metadata": {"source": "fresh"}}) + "\n")
    return root / "run" / "model", root / "tokens", unseen


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _by_repeats(result: dict) -> list[dict]:
    return [result["sources"][f"canaries-x{n}"] for n in (1, 4, 16, 64)]


def test_memorization_of_canaries_rises_with_repetitions_and_their_pii_is_found(pretrained, tmp_path, one_thread):
    from gemmalab.evaluate.memorization import memorization

    model_dir, tokens, _ = pretrained
    cfg = MemorizationConfig(str(model_dir), str(tokens), samples=20, prefix=PREFIX, suffix=SUFFIX, prune=False,
                             batch_size=8, prefill_batch=4)
    result = memorization(cfg, tmp_path / "audit", progress=False)
    x1, x4, x16, x64 = _by_repeats(result)
    assert [s["documents"] for s in (x1, x4, x16, x64)] == [2, 2, 2, 2]  # one per distinct canary, split by copies
    rates = [s["approx_rate"] for s in (x1, x4, x16, x64)]
    assert rates == sorted(rates) and rates[0] == 0.0 and x64["exact_rate"] == 1.0
    assert x64["mean_distance"] < x16["mean_distance"] < min(x1["mean_distance"], x4["mean_distance"]) - 0.2
    assert result["sources"]["web"]["approx_rate"] == 0.0  # prose seen about 4 times
    # the planted personal data, by type, in the memorized continuations; the spans are the planted ones
    assert x64["pii"] == {"sensitive": {"SSN": 2}, "personal": {"EMAIL": 2, "PHONE": 2}}
    assert x64["memorized_with_pii"] == {"sensitive": 2, "personal": 2}
    planted = {p["text"] for line in (tokens / "canaries.jsonl").read_text().splitlines()
               for p in json.loads(line)["metadata"]["pii"] if json.loads(line)["metadata"]["repeats"] == 64}
    memorized = [json.loads(line) for line in (tmp_path / "audit" / "memorized.jsonl").read_text().splitlines()]
    found = {p["text"] for m in memorized if m["source"] == "canaries-x64" for p in m["pii"]}
    assert found == planted and len(planted) == 6
    assert all(p["class"] == ("sensitive" if p["kind"] == "SSN" else "personal") for m in memorized for p in m["pii"])
    assert result["pii"]["sensitive"]["SSN"] >= 2


def test_pruning_changes_no_verdict_and_no_token(pretrained, one_thread):
    import gemmalab
    from gemmalab.inference import Engine, SamplingParams

    model_dir, tokens, unseen = pretrained
    model, tok = gemmalab.load(model_dir)
    cfg = MemorizationConfig(str(model_dir), str(tokens), samples=6, prefix=PREFIX, suffix=SUFFIX, batch_size=3,
                             prefill_batch=2)
    samples, _ = draw_samples(load_corpus(tokens, tok), cfg)
    inside, _ = draw_samples(load_corpus(tokens, tok), dataclasses.replace(cfg, offset="random", seed=5, prefix=8,
                                                                            suffix=64))
    fresh, counts = draw_samples(load_corpus(unseen, tok), cfg)
    assert counts["fresh"] == {"documents": 5, "too_short": 1, "sampled": 4}
    samples += fresh
    # 18 samples through 3 slots: rows leave and join mid-batch
    full = {r["id"]: r for r in audit(model, tok, samples, dataclasses.replace(cfg, prune=False))}
    assert set(full) == {s.id for s in samples}
    # The boundary at 10%, and boundaries right at (and just below) the final distance of rows that reach it before
    # their last token: the rows an unsound bound would prune wrongly.
    early = set()
    for sample in samples:
        r, row = full[sample.id], first_row(SUFFIX)
        for token in r["generated"][:-1]:
            row = edit_row(row, token, np.array(sample.target))
        if 0 < r["distance"] == row[SUFFIX - 1]:
            early.add(r["distance"])
    distances = sorted(early)[:2]
    assert distances
    # Without the character level too: its bound would otherwise hide a wrong token-level one.
    for threshold, char_level in [(t, c) for t in [0.1] + [d / SUFFIX for dist in distances for d in (dist, dist - 1)]
                                  for c in (True, False)]:
        at = dataclasses.replace(cfg, threshold=threshold, char_level=char_level)
        pruned = {r["id"]: r for r in audit(model, tok, samples, at)}
        assert set(pruned) == set(full)
        for sid, r in full.items():
            p = pruned[sid]
            assert (p["exact"], p["approx"]) == (r["exact"], r["distance"] <= at.max_distance), (sid, threshold)
            assert p["generated"] == r["generated"][:len(p["generated"])]  # the same tokens, only fewer
            if p["pruned"]:
                assert r["distance"] >= p["distance_at_least"] > at.max_distance
            if char_level:
                assert p["char_approx"] == (r["char_normalized"] <= threshold), (sid, threshold)
                if p["pruned"]:
                    assert r["char_normalized"] >= p["char_normalized_at_least"] > threshold
        if threshold == 0.1 and char_level:
            assert sum(p["pruned"] for p in pruned.values()) >= 8
            assert sum(len(p["generated"]) for p in pruned.values()) < 0.5 * sum(len(r["generated"])
                                                                                 for r in full.values())
    assert {r["approx"] for r in full.values()} == {True, False}
    assert all(r["exact"] for r in full.values() if r["source"] == "canaries-x64")
    assert not any(r["approx"] or r["char_approx"] for r in full.values() if r["source"] == "fresh")
    # from inside the documents too: a run of only those gives each the same tokens
    cut = dataclasses.replace(cfg, prefix=8, suffix=64, prune=False)
    alone = {r["id"]: r for r in audit(model, tok, inside, cut)}
    mixed = {r["id"]: r for r in audit(model, tok, inside[::-1], cut)}
    assert alone == mixed and any(r["exact"] for r in alone.values())
    # a memorized row equals a plain one-row greedy generation through the engine
    s = next(s for s in samples if s.source == "canaries-x64")
    plain = Engine(model, tok).generate([[tok.bos_id, *s.prompt]], SamplingParams(max_new_tokens=SUFFIX, stop_ids=()))
    assert plain[0].ids == full[s.id]["generated"] == s.target


def test_the_stage_through_the_command_line_resumes_and_refuses_other_settings(pretrained, tmp_path, capsys,
                                                                               monkeypatch, one_thread):
    from gemmalab.cli import main

    model_dir, tokens, unseen = pretrained
    out = tmp_path / "audit"
    argv = ["memorization", "--model", str(model_dir), "--corpus", str(tokens / "canaries.jsonl"), "--prefix",
            str(PREFIX), "--suffix", str(SUFFIX), "--batch-size", "4", "--prefill-batch", "2", "--out", str(out),
            "--quiet", "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "canaries-x64" in printed and "result.json" in printed
    result = json.loads((out / "result.json").read_text())
    assert result["stage"] == "memorization" and result["status"] == "finished" and result["samples"] == 8
    x64 = result["sources"]["canaries-x64"]
    assert x64["exact_rate"] == 1.0 and x64["exact_ci95"] == pytest.approx(wilson(2, 2))
    assert x64["distance_counts"]["0"] == 2 and sum(x64["distance_counts"].values()) == 2
    assert x64["mean_distance"] is None or x64["pruned"] == 0  # means only when every distance is known
    assert (out / "memorization.png").read_bytes()[:4] == b"\x89PNG"
    records = (out / "samples.jsonl").read_text().splitlines()
    assert len(records) == 8 and all(json.loads(r)["offset"] == 0 for r in records)

    # an audit cut short (3 records and half a line on disk) resumes to the same result
    (out / "samples.jsonl").write_text("\n".join(records[:3]) + "\n" + records[3][:20])
    (out / "result.json").unlink()
    asked = []
    import gemmalab.evaluate.memorization as mem

    real_audit = mem.audit
    monkeypatch.setattr(mem, "audit", lambda model, tok, pending, cfg, on_done=None:
                        asked.extend(pending) or real_audit(model, tok, pending, cfg, on_done))
    assert main(argv) == 0
    assert len(asked) == 5
    again = json.loads((out / "result.json").read_text())
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in result.items() if k != "seconds"}
    asked.clear()
    assert main(argv) == 0 and asked == []  # all on disk: the model is asked nothing
    capsys.readouterr()
    assert main(argv + ["--threshold", "0.2"]) == 2
    assert "other settings (threshold differ)" in capsys.readouterr().err


def test_bad_input_is_a_clear_error(pretrained, tmp_path, tiny_tokenizer):
    from gemmalab.data.packing import pack
    from gemmalab.evaluate.memorization import memorization
    from gemmalab.tokenizer import train_tokenizer

    with pytest.raises(GemmalabError, match="Corpus not found"):
        load_corpus(tmp_path / "nope.jsonl", tiny_tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": 5}\n')
    with pytest.raises(GemmalabError, match="bad.jsonl, line 2: `text` must be a string"):
        load_corpus(bad, tiny_tokenizer)
    bad.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(GemmalabError, match="bad.jsonl.*line 2"):
        load_corpus(bad, tiny_tokenizer)
    with pytest.raises(GemmalabError, match="`offset` must be start or random"):
        MemorizationConfig(corpus="x", offset="middle")
    with pytest.raises(GemmalabError, match="`threshold` must be in"):
        MemorizationConfig(corpus="x", threshold=1.5)
    model_dir, tokens, unseen = pretrained
    with pytest.raises(GemmalabError, match="no document has prefix \\+ suffix = 1100 tokens"):
        memorization(MemorizationConfig(str(model_dir), str(unseen), prefix=100, suffix=1000), tmp_path / "a")
    # shards made with another tokenizer
    (tmp_path / "t.txt").write_text("\n".join(f"other words {i} here and there" for i in range(300)))
    other = train_tokenizer([tmp_path / "t.txt"], 300, tmp_path / "tok")
    pack(unseen, other, tmp_path / "shards", seq_len=64, progress=False)
    with pytest.raises(GemmalabError, match="another tokenizer"):
        load_corpus(tmp_path / "shards", tiny_tokenizer)
    shards = load_corpus(tmp_path / "shards", other)  # the right one: BOS and EOS stripped from each document
    first = json.loads(unseen.read_text().splitlines()[0])["text"]
    assert list(shards["fresh"][0][1]) == other.encode(first, bos=False)
