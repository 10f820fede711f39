"""`prepare` end to end: planted cases, exact count reconciliation, local vs Ray executors, configs."""

import gzip
import json
from pathlib import Path

import pytest
import zstandard
from pydoc_data.topics import topics

from gemmalab.config import from_table, load
from gemmalab.data.config import DataConfig
from gemmalab.data.pipeline import build_executors, build_stages, prepare, resolve_inputs
from gemmalab.errors import GemmalabError

REPO = Path(__file__).resolve().parents[1]
# Real English prose (Python reference pages) that passes the Gopher heuristics: distinct documents.
PROSE_TOPICS = ["async", "augassign", "binary", "booleans", "class", "context-managers", "dict", "exceptions",
                "for", "global", "in", "raise", "slicings", "subscriptions", "with"]
GSM_Q = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
         "How many clips did Natalia sell altogether in April and May?")
GERMAN = ("Die Geschichte der Stadt ist lang und reich an Ereignissen. Im Mittelalter war sie ein wichtiger "
          "Handelsplatz, an dem sich Kaufleute aus dem ganzen Land trafen. Später wurde die Stadt durch einen "
          "großen Brand fast vollständig zerstört, aber die Bürger bauten sie mit viel Mühe wieder auf. Heute "
          "besuchen jedes Jahr viele Menschen die alte Kirche, den Marktplatz und das kleine Museum am Fluss.")
TOXIC = "\n".join([  # passes the quality heuristics, so the safety filter is what drops it
    "You are a fucking idiot and the worst person in the whole world.",
    "What a shitty day it has been with all of that nonsense at work.",
    "Shut up you stupid moron and go to hell with all of your friends.",
    "This asshole stole the bike and then laughed at the owner of it.",
    "Fuck this town and the people that have lived here for many years.",
    "The bitch next door yelled at the kids and the dog all night long.",
    "We went to the market in the morning to buy some bread and milk.",
    "The weather was warm and the children played in the park with a ball."])
CODE = "def add(a, b):\n    return a + b\n\n\nfor i in range(10):\n    print(add(i, i))\n"


def _change_words(text: str, every: int = 80) -> str:
    """A near-duplicate: every `every`-th word replaced (a few words changed)."""
    words = text.split(" ")
    return " ".join("CHANGED" if i % every == every // 2 else w for i, w in enumerate(words))


def _line(id, text, source="web"):
    return json.dumps({"id": id, "text": text, "metadata": {"source": source}})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Input files with planted cases; returns the folder and what each planted document should do."""
    root = tmp_path_factory.mktemp("corpus")
    inp = root / "input"
    inp.mkdir()
    web = [_line(f"web-{t}", topics[t]) for t in PROSE_TOPICS]
    web += [
        _line("near-dup-of-web-async", _change_words(topics["async"])),
        _line("exact-dup-of-web-for", "  " + topics["for"].upper().replace(" ", "   ") + "\n"),
        _line("contaminated", topics["raise"][:600] + "\n" + GSM_Q + "\n" + topics["try"][:1500]),
        _line("pii", topics["naming"] + "\nMail jane.doe@example.com, SSN 123-45-6789."),
        _line("toxic", TOXIC),
        _line("german", GERMAN * 3),
        _line("empty", "   \n  "),
    ]
    malformed = ["{this is not json", "", '["a list", "not an object"]', json.dumps({"id": "no-text"}),
                 json.dumps({"id": "int-text", "text": 42})]
    (inp / "web.jsonl").write_text("\n".join(web[:10] + malformed[:3]) + "\n", encoding="utf-8")
    with gzip.open(inp / "web2.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(web[10:] + malformed[3:]) + "\n")
    code = [_line(f"code-{i}", CODE.replace("add", f"add{i}") * (i + 1), "code") for i in range(3)]
    math = [_line(f"math-{i}", f"Compute {i} * 7 = {i * 7}. Then {i * 7} + 16 = {i * 7 + 16}.", "math")
            for i in range(3)]
    (inp / "code.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(code) + "\n").encode()))
    bad_utf8 = b'{"id": "bad-utf8", "text": "caf\xe9"}\n'
    (inp / "math.jsonl").write_bytes(("\n".join(math) + "\n").encode() + bad_utf8)
    gsm = root / "gsm8k.jsonl"
    gsm.write_text(json.dumps({"question": GSM_Q, "answer": "#### 72"}) + "\n")
    return {"input": inp, "gsm8k": gsm, "root": root,
            "malformed": {"invalid_json": 1, "blank_line": 1, "not_an_object": 1, "missing_text": 1,
                          "non_string_text": 1, "invalid_utf8": 1}}


def _config(corpus, **executor) -> DataConfig:
    return from_table(DataConfig, {
        "inputs": [{"path": str(corpus["input"])}],
        "decontamination": {"benchmarks": [{"name": "gsm8k", "path": str(corpus["gsm8k"]), "format": "gsm8k"}]},
        # fewer LSH bands than the default keeps the bucket stage to 6 tasks; a 97%-similar pair still matches
        "dedup": {"num_buckets": 6, "hashes_per_bucket": 4},
        "executor": {"tasks": 2, **executor},
        "pack": {"enabled": False},  # packing has its own tests, and one end-to-end test below
    }, "test config")


def _documents(out: Path) -> dict[str, dict]:
    docs = {}
    for f in sorted((out / "documents").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            d = json.loads(line)
            docs[d["id"]] = d
    return docs


@pytest.fixture(scope="module")
def local_run(corpus):
    out = corpus["root"] / "out-local"
    card = prepare(_config(corpus), out)
    return out, card


def test_counts_reconcile_exactly(local_run, corpus):
    out, card = local_run
    docs = _documents(out)
    assert card.reconciled
    n_valid = len(PROSE_TOPICS) + 7 + 3 + 3  # web + planted + code + math
    assert card.documents_in == n_valid
    assert card.documents_out == len(docs)
    assert card.documents_in == card.documents_out + sum(sum(r.values()) for r in card.drops_by_filter.values())
    assert card.malformed_lines == corpus["malformed"]
    for src, s in card.sources.items():
        assert s["documents_in"] == s["documents_out"] + sum(s["dropped"].values()), src
    assert card.sources["code"]["documents_in"] == card.sources["code"]["documents_out"] == 3
    assert card.sources["math"]["documents_out"] == 3
    written = json.loads((out / "data_card.json").read_text())
    assert written["documents_in"] == n_valid and written["reconciled"] is True
    # the run directory contract: the resolved config, and result.json with the headline figures
    assert load(DataConfig, out / "config.toml") == _config(corpus)
    result = json.loads((out / "result.json").read_text())
    assert (result["stage"], result["status"]) == ("data", "finished")
    assert (result["documents_in"], result["documents_out"], result["malformed_lines"]) == (
        n_valid, len(docs), sum(corpus["malformed"].values()))


def test_planted_cases(local_run):
    out, card = local_run
    docs = _documents(out)
    drops = card.drops_by_filter
    assert drops["dedup"] == {"exact_duplicate": 1, "near_duplicate": 1}
    assert drops["decontam"] == {"contaminated": 1}
    assert drops["language"] == {"not_en": 1}
    assert drops["safety"] == {"toxic_doc": 1}
    assert drops["reader"] == {"empty": 1}
    # one document of each duplicate pair kept, every distinct document kept
    assert ("web-async" in docs) != ("near-dup-of-web-async" in docs)
    assert ("web-for" in docs) != ("exact-dup-of-web-for" in docs)
    for t in PROSE_TOPICS:
        assert f"web-{t}" in docs or t in ("async", "for")
    for gone in ("contaminated", "toxic", "german", "empty"):
        assert gone not in docs
    # PII redacted with typed placeholders, counted
    assert docs["pii"]["text"].endswith("Mail <EMAIL>, SSN <SSN>.")
    assert card.pii_found["EMAIL"] >= 1 and card.pii_found["SSN"] == 1
    # the planted benchmark question is caught and reported
    report = json.loads((out / "decontamination.json").read_text())
    gsm = report["benchmarks"]["gsm8k"]
    assert gsm["items_found"] == 1 and gsm["documents_hit"] == 1
    assert gsm["contaminated_items"][0]["documents"] == ["contaminated"]
    assert card.contamination["gsm8k"]["documents_hit"] == 1


def test_ray_executor_same_output_as_local(local_run, corpus):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = corpus["root"] / "out-ray"
        card = prepare(_config(corpus, kind="ray", workers=2), out)
    finally:
        ray.shutdown()
    local_out, local_card = local_run
    for f in sorted((local_out / "documents").glob("*.jsonl")):
        assert (out / "documents" / f.name).read_bytes() == f.read_bytes(), f.name
    assert sorted(p.name for p in (out / "documents").glob("*")) == sorted(
        p.name for p in (local_out / "documents").glob("*"))
    assert card.executor == "ray"
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("executor", "config")}  # noqa: E731
    assert strip(card) == strip(local_card)


def test_slurm_executors_are_chained(corpus, tmp_path):
    cfg = _config(corpus, kind="slurm", slurm_partition="cpu")
    stages = build_stages(cfg, tmp_path, resolve_inputs(cfg, tmp_path))
    executors = build_executors(cfg, stages, tmp_path)
    from datatrove.executor.slurm import SlurmPipelineExecutor

    assert [s.name for s in stages] == ["filter", "exact_find", "exact_filter", "minhash_buckets", "minhash_cluster",
                                        "minhash_filter"]
    assert all(isinstance(e, SlurmPipelineExecutor) for e in executors)
    assert [e.depends for e in executors[1:]] == executors[:-1]
    assert executors[3].tasks == 6 and executors[1].tasks == 1


def test_dedup_off_is_one_stage(corpus, tmp_path):
    cfg = _config(corpus)
    cfg.dedup.exact = cfg.dedup.minhash = False
    assert [s.name for s in build_stages(cfg, tmp_path, [])] == ["filter"]


def test_builtin_config_loads_and_bad_keys_are_named(tmp_path):
    cfg = load(DataConfig, REPO / "configs" / "data" / "builtin.toml")
    assert cfg.inputs[0].builtin and cfg.out_dir == "runs/data/builtin"
    assert cfg.source_kinds == {"code": "code", "math": "math"}
    # partial tables override their defaults key by key: code keeps code rules, not prose ones
    assert cfg.quality.code.min_stop_words is None and cfg.quality.code.max_mean_line_length == 200
    assert cfg.quality.math.min_alpha_words_frac is None and cfg.quality.prose.min_stop_words == 2
    off = from_table(DataConfig, {"inputs": [{"path": "x"}], "quality": {"prose": {"min_stop_words": False}}}, "t")
    assert off.quality.prose.min_stop_words is None and off.quality.prose.min_words == 50
    bad = tmp_path / "bad.toml"
    bad.write_text('[[inputs]]\npath = "x"\n[quality.prose]\nmin_wrds = 3\n')
    with pytest.raises(GemmalabError, match=r"bad.toml: unknown key `quality.prose.min_wrds`"):
        load(DataConfig, bad)
    bad.write_text('[[inputs]]\npath = "x"\n[executor]\ntasks = "two"\n')
    with pytest.raises(GemmalabError, match=r"`executor.tasks` must be int"):
        load(DataConfig, bad)
    bad.write_text('[[inputs]]\npath = "x"\n[pii]\nmode = "mask"\n')
    with pytest.raises(GemmalabError, match=r"pii.mode"):
        load(DataConfig, bad)


def test_reader_counts_truncated_file_without_crashing(tmp_path):
    from gemmalab.data.reader import CountingJsonlReader, InputFile

    path = tmp_path / "cut.jsonl.gz"
    full = gzip.compress(("\n".join(_line(f"d{i}", f"text number {i} " * 200) for i in range(50)) + "\n").encode())
    path.write_bytes(full[: len(full) // 2])  # a download cut in half
    reader = CountingJsonlReader([InputFile(str(path), "web")])
    docs = list(reader.run())
    counts = {k: v.total for k, v in reader.stats.stats.items()}
    assert 0 < len(docs) < 50
    assert counts["gl|in|web"] == len(docs)
    assert counts["gl|malformed|unreadable_file|cut.jsonl.gz"] == 1


def test_tokens_counted_per_source_with_a_tokenizer(corpus, tmp_path):
    from gemmalab.tokenizer import train_tokenizer

    train = tmp_path / "train.txt"
    train.write_text("\n".join(topics[t].replace("\n", " ") for t in PROSE_TOPICS) + "\n" + CODE.replace("\n", " "))
    train_tokenizer([train], 400, tmp_path / "tok")
    cfg = _config(corpus)
    cfg.tokenizer = str(tmp_path / "tok")
    cfg.dedup.exact = cfg.dedup.minhash = False
    cfg.pack.enabled = True
    card = prepare(cfg, tmp_path / "out")
    web, code = card.sources["web"], card.sources["code"]
    assert web["tokens_in"] > web["tokens_out"] > web["words_out"]  # drops took tokens away
    assert code["tokens_in"] == code["tokens_out"] > 0
    # the kept documents were packed with that tokenizer: BOS + text + EOS per document
    meta = json.loads((tmp_path / "out" / "tokens" / "meta.json").read_text())
    for name in ("web", "code"):
        src = card.sources[name]
        assert meta["sources"][name] == {"docs": src["documents_out"], "tokens": src["tokens_out"] + 2 * src["documents_out"]}


def test_packing_trains_a_tokenizer_when_none_is_named(corpus, tmp_path):
    cfg = _config(corpus)
    cfg.dedup.exact = cfg.dedup.minhash = False
    cfg.pack.enabled, cfg.pack.vocab_size = True, 600
    card = prepare(cfg, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "tokens" / "meta.json").read_text())
    assert meta["vocab_size"] == 600 and (tmp_path / "out" / "tokenizer" / "tokenizer.model").is_file()
    assert meta["num_docs"] == card.documents_out
    for name, src in card.sources.items():  # the card counts tokens with the tokenizer the shards use
        assert meta["sources"][name]["tokens"] == src["tokens_out"] + 2 * src["documents_out"]
        assert src["tokens_in"] >= src["tokens_out"]


def _bad_input_config(tmp_path) -> Path:
    config = tmp_path / "data.toml"
    config.write_text(f'[[inputs]]\npath = "{tmp_path / "no-such-input"}"\n[pack]\nenabled = false\n')
    return config


def test_prepare_refuses_a_folder_that_is_not_its_own(tmp_path, capsys):
    """--out pointing at someone's folder: refused by name, before documents/, logs/ and work/ are deleted."""
    from gemmalab.cli import main

    theirs = tmp_path / "theirs"
    (theirs / "documents").mkdir(parents=True)
    (theirs / "documents" / "thesis.txt").write_text("years of work")
    (theirs / "config.toml").write_text("# someone else's config\n")
    assert main(["data", "prepare", "--config", str(_bad_input_config(tmp_path)), "--out", str(theirs)]) == 2
    err = capsys.readouterr().err
    assert f"output folder {theirs} is not empty and is not an earlier `gemmalab data prepare` output" in err
    assert (theirs / "documents" / "thesis.txt").read_text() == "years of work"
    (tmp_path / "empty").mkdir()  # a new or empty folder is fine (here the missing input stops it later)
    assert main(["data", "prepare", "--config", str(_bad_input_config(tmp_path)), "--out", str(tmp_path / "empty")]) == 2
    assert "inputs[0]: path not found" in capsys.readouterr().err


def test_a_stopped_prepare_leaves_no_old_card_beside_new_documents(tmp_path):
    """An earlier run's card, counts and meta.json go before the new run writes anything, so a run that stops (here:
    a missing input) never presents the old counts as its own."""
    from gemmalab.runs import RunDir

    out = tmp_path / "out"
    RunDir(out, "data").snapshot(load(DataConfig, _bad_input_config(tmp_path)))
    old = ["result.json", "data_card.json", "decontamination.json", "tokens/meta.json", "documents/00000.jsonl"]
    for name in old:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text('{"documents_out": 999}\n')
    with pytest.raises(GemmalabError, match="path not found"):
        prepare(load(DataConfig, _bad_input_config(tmp_path)), out)
    assert [name for name in old if (out / name).exists()] == []
    assert (out / "config.toml").is_file()  # the folder stays marked as a preparation's


def test_counts_that_do_not_reconcile_exit_non_zero(tmp_path, monkeypatch, capsys):
    import gemmalab.data.pipeline as pipeline
    from gemmalab.cli import main
    from gemmalab.data.card import DataCard
    from gemmalab.runs import RunDir

    def lost_documents(config, out, log_file=None):
        RunDir(out, "data").write_result("finished", {"malformed_lines": 0, "data_card": str(out / "data_card.json")})
        return DataCard(10, 5, 4, False, sources={"web": {"documents_in": 10, "documents_out": 5,
                                                          "documents_dropped": 4, "reconciled": False}})

    monkeypatch.setattr(pipeline, "prepare", lost_documents)
    assert main(["data", "prepare", "--config", str(_bad_input_config(tmp_path)), "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert "counts reconcile: False" in captured.out
    assert "the counts do not reconcile (documents in != out + dropped) for web (10 in, 5 out, 4 dropped)" in captured.err
