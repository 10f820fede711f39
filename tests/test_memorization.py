"""The memorization audit: classification on both sides of the 10% boundary, the pruning bound, Wilson intervals, a
tiny model trained to memorize some documents (found, and unseen ones not), pruned == unpruned, PII in memorized
text by type, the stage through the command line, resume, and bad corpora."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from gemmalab.errors import GemmalabError
from gemmalab.evaluate.memorization import (MemorizationConfig, audit, classify, draw_samples, edit_lower_bound,
                                            edit_row, load_corpus, memorization, wilson)
from gemmalab.model import Gemma, get_preset


def test_exact_and_approximate_on_both_sides_of_the_boundary():
    target = list(range(50))
    assert classify(target, target, 5) == {"distance": 0, "normalized": 0.0, "exact": True, "approx": True}
    five = [t + 100 if i % 10 == 0 else t for i, t in enumerate(target)]  # 5 of 50 substituted: 10%
    assert classify(five, target, 5)["approx"] and not classify(five, target, 5)["exact"]
    six = [t + 100 if i in (0, 10, 20, 30, 40, 45) else t for i, t in enumerate(target)]  # 12%
    assert classify(six, target, 5) == {"distance": 6, "normalized": 0.12, "exact": False, "approx": False}
    shifted = target[1:] + [99]  # one deletion + one insertion: distance 2
    assert classify(shifted, target, 5)["distance"] == 2
    assert MemorizationConfig(corpus="x").max_distance == 5
    assert MemorizationConfig(corpus="x", suffix=32).max_distance == 3


def test_the_pruning_bound_never_exceeds_the_final_distance():
    from rapidfuzz.distance import Levenshtein

    rng = random.Random(0)
    for _ in range(200):
        target = [rng.randrange(6) for _ in range(12)]
        generated = [rng.randrange(6) for _ in range(12)]
        final = Levenshtein.distance(generated, target)
        row = list(range(len(target) + 1))
        for t, token in enumerate(generated, 1):
            row = edit_row(row, token, target)
            assert row == [Levenshtein.distance(generated[:t], target[:j]) for j in range(len(target) + 1)]
            assert edit_lower_bound(row) <= final
        assert row[-1] == final


def test_wilson_intervals():
    assert wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert wilson(10, 10)[1] == 1.0


# ---- a tiny model that memorized some documents ----------------------------------------------------------------

SECRET = "export API_SECRET=Zq8vR2kLmN4pXw7T"


def _documents(rng: random.Random, n: int) -> list[str]:
    words = ["river", "stone", "cloud", "table", "music", "light", "paper", "ocean", "tiger", "honey", "glass", "bread"]
    return [" ".join(rng.choice(words) + str(rng.randrange(100)) for _ in range(60)) for _ in range(n)]


@pytest.fixture(scope="module")
def memorizer(tiny_tokenizer, tmp_path_factory):
    """(model dir, JSONL corpus): 4 documents trained to memorization ("seen", two with planted PII), 4 never seen."""
    from gemmalab.checkpoint import save_hf

    rng = random.Random(1)
    seen, unseen = _documents(rng, 4), _documents(rng, 4)
    seen[0] = seen[0][:12] + " write to jane.doe@example.com or " + SECRET + " " + seen[0][50:]
    torch.manual_seed(0)
    model = Gemma(dataclasses.replace(get_preset("tiny-gemma"), dim=128, ffn_dim=256))
    model.init_weights(std=0.02, seed=3)
    rows = [torch.tensor([tiny_tokenizer.bos_id] + tiny_tokenizer.encode(t, bos=False)[:160]) for t in seen]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(150):
        for row in rows:
            logits = model(row[None, :-1])
            loss = torch.nn.functional.cross_entropy(logits[0], row[1:])
            loss.backward()
        opt.step()
        opt.zero_grad()
    root = tmp_path_factory.mktemp("memorizer")
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"{src}{i}", "text": t, "metadata": {"source": src}}) + "\n"
                              for src, docs in (("seen", seen), ("unseen", unseen)) for i, t in enumerate(docs))
                      + json.dumps({"text": "too short", "metadata": {"source": "unseen"}}) + "\n")
    return save_hf(model, root / "model", tiny_tokenizer), corpus


def test_memorized_documents_are_found_and_pruning_changes_no_verdict(memorizer, tiny_tokenizer):
    import gemmalab

    model_dir, corpus = memorizer
    model, tok = gemmalab.load(model_dir)
    cfg = MemorizationConfig(str(model_dir), str(corpus), samples=10, prefix=20, suffix=40, batch_size=3)
    samples, counts = draw_samples(load_corpus(corpus, tok), cfg)
    assert counts["unseen"] == {"documents": 5, "too_short": 1, "sampled": 4}
    # also from inside the documents: 16 samples through 3 slots, so rows leave and join mid-batch
    inside, _ = draw_samples(load_corpus(corpus, tok), dataclasses.replace(cfg, offset="random", seed=5))
    samples += [dataclasses.replace(s, id=s.id + "+") for s in inside]
    pruned = {r["id"]: r for r in audit(model, tok, samples, cfg)}
    full = {r["id"]: r for r in audit(model, tok, samples, dataclasses.replace(cfg, prune=False))}
    assert set(pruned) == set(full) == {s.id for s in samples}
    for sid, r in full.items():
        p = pruned[sid]
        assert (p["exact"], p["approx"]) == (r["exact"], r["approx"]), sid
        assert p["generated"] == r["generated"][:len(p["generated"])]  # the same tokens, only fewer
        if p["pruned"]:
            assert r["distance"] >= p["distance_at_least"] > cfg.max_distance
    seen = [r for r in full.values() if r["source"] == "seen"]
    unseen = [r for r in full.values() if r["source"] == "unseen"]
    assert all(r["exact"] for r in seen if not r["id"].endswith("+"))  # every seen document, from its start
    assert not any(r["approx"] for r in unseen)
    assert sum(p["pruned"] for p in pruned.values()) >= len(unseen)  # the unseen rows stopped early
    # each row alone: the greedy continuation equals a plain one-row generation
    from gemmalab.inference import Engine, SamplingParams

    s = samples[0]
    plain = Engine(model, tok).generate([[tok.bos_id, *s.prompt]], SamplingParams(max_new_tokens=40, stop_ids=()))[0]
    assert plain.ids == full[s.id]["generated"]


def test_the_stage_counts_pii_resumes_and_writes_its_files(memorizer, tmp_path, capsys, monkeypatch):
    from gemmalab.cli import main

    model_dir, corpus = memorizer
    out = tmp_path / "audit"
    argv = ["memorization", "--model", str(model_dir), "--corpus", str(corpus), "--prefix", "10", "--suffix", "90",
            "--batch-size", "4", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert "seen" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["stage"] == "memorization" and result["samples"] == 8
    seen, unseen = result["sources"]["seen"], result["sources"]["unseen"]
    assert seen["exact_rate"] == 1.0 and seen["exact_ci95"][0] > 0.4 and unseen["approx_rate"] == 0.0
    assert unseen["too_short"] == 1 and unseen["documents"] == unseen["too_short"] + unseen["sampled"]
    assert seen["pii"] == {"sensitive": {"SECRET": 1}, "personal": {"EMAIL": 1}}
    memorized = [json.loads(line) for line in (out / "memorized.jsonl").read_text().splitlines()]
    assert len(memorized) == 4
    spans = [p for m in memorized for p in m["pii"]]
    assert sorted((p["kind"], p["text"]) for p in spans) == [("EMAIL", "jane.doe@example.com"),
                                                            ("SECRET", "Zq8vR2kLmN4pXw7T")]
    assert (out / "memorization.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun reads every record back and asks the model nothing
    import gemmalab.evaluate.memorization as mem

    monkeypatch.setattr(mem, "audit", lambda model, tok, pending, cfg, on_done=None: pending and pytest.fail("re-ran"))
    assert main(argv) == 0
    assert main(argv + ["--threshold", "0.2"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_bad_corpora_are_clear_errors(memorizer, tmp_path, tiny_tokenizer):
    from gemmalab.data.packing import pack

    with pytest.raises(GemmalabError, match="Corpus not found"):
        load_corpus(tmp_path / "nope.jsonl", tiny_tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": 5}\n')
    with pytest.raises(GemmalabError, match="bad.jsonl, line 2: `text` must be a string"):
        load_corpus(bad, tiny_tokenizer)
    # shards made with another tokenizer
    from gemmalab.tokenizer import train_tokenizer

    (tmp_path / "t.txt").write_text("\n".join(f"other words {i} here and there" for i in range(300)))
    other = train_tokenizer([tmp_path / "t.txt"], 300, tmp_path / "tok")
    _, corpus = memorizer
    pack(corpus, other, tmp_path / "shards", seq_len=64)
    with pytest.raises(GemmalabError, match="another tokenizer"):
        load_corpus(tmp_path / "shards", tiny_tokenizer)
    shards = load_corpus(tmp_path / "shards", other)  # the right one: BOS and EOS stripped from each document
    assert set(shards) == {"seen", "unseen"} and all(ids[0] != other.bos_id for _, ids in shards["seen"])
    assert list(shards["seen"][0][1]) == other.encode(json.loads(corpus.read_text().splitlines()[0])["text"], bos=False)
