"""Tests for gemmalab.tokenizer: parity with transformers on the real Gemma 3 vocabulary, a trained
tokenizer's Gemma behaviours (digits, whitespace, byte fallback, round trip), and error reporting."""

from __future__ import annotations

import gzip
import json
import pickle
import random
import re
from pathlib import Path

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemmalab.errors import GemmalabError
from gemmalab.tokenizer import GEMMA_CHAT_TEMPLATE, Tokenizer, TokenizerError, train_tokenizer

# ---- deterministic test strings -------------------------------------------------------------

WORDS = {
    "latin": "café naïve façade señor über straße déjà-vu œuvre Ångström São Paulo Łódź čeština".split(),
    "cyrillic": "Привет мир съешь ещё этих мягких французских булок Україна щоб".split(),
    "greek": "Καλημέρα κόσμε ξεσκεπάζω ψυχοφθόρα βδελυγμία Ελλάδα".split(),
    "arabic": "مرحبا بالعالم اللغة العربية كتاب مدرسة".split(),
    "hebrew": "שלום עולם עברית ספר בית".split(),
    "devanagari": "नमस्ते दुनिया हिन्दी भाषा किताब क्षत्रिय".split(),
    "thai": "สวัสดีชาวโลก ภาษาไทย หนังสือ".split(),
    "cjk": "你好世界 中文 日本語のテキスト 東京 漢字 龘".split(),
    "hangul": "안녕하세요 세계 한국어 텍스트 읽기".split(),
}
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇫🇷", "🧑🏿‍💻", "👩🏻‍🦰", "🤖", "✨", "🫠", "1️⃣"]
CODE = [
    "def f(x):\n    return x * 2\n",
    "class A:\n    def __init__(self):\n        self.y = [1, 2, 3]\n",
    "for (let i = 0; i < n; i++) {\n\tconsole.log(`i=${i}`);\n}\n",
    '<div class="a">\n  <p>Hello <b>world</b></p>\n</div>',
    "<table><tr><td>1</td></tr></table>",
    "if __name__ == '__main__':\n\tmain()\r\n",
    "SELECT * FROM t WHERE id = 42;",
    "x = {'a': 1, \"b\": [2.5, -3e10]}  # comment",
]
CONTROL_TEXT = [
    "<start_of_turn>user\nhi<end_of_turn>",
    "<bos>",
    "<bos>Hello",
    "<start_of_turn>model\nSure!<end_of_turn>\n",
    "text <eos> more",
    "<unused42> and <unused6241>",
    "<start_of_image>x<end_of_image>",
    "<pad><mask><unk>",
    "<start_of_turn<end_of_turn>>",
    "<<bos>>",
]


def _fragment(rng: random.Random) -> str:
    kind = rng.choice(["words", "words", "emoji", "digits", "spaces", "newlines", "code", "ascii", "random_cp"])
    if kind == "words":
        script = rng.choice(list(WORDS))
        return " ".join(rng.choice(WORDS[script]) for _ in range(rng.randint(1, 6)))
    if kind == "emoji":
        return "".join(rng.choice(EMOJI) + rng.choice(["", " "]) for _ in range(rng.randint(1, 4)))
    if kind == "digits":
        return rng.choice([str(rng.randint(0, 10**rng.randint(1, 30))), f"{rng.random() * 1000:.4f}", "2024-01-31", "1,234,567"])
    if kind == "spaces":
        return rng.choice([" ", "\t"]) * rng.randint(1, 40) + rng.choice(["", "x", "\t", " y"])
    if kind == "newlines":
        return rng.choice(["\n", "\r\n", "\n\n", "\r", "\n \n", "\n\t"]) * rng.randint(1, 5)
    if kind == "code":
        return rng.choice(CODE)
    if kind == "ascii":
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCXYZ .,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`") for _ in range(rng.randint(1, 30)))
    # random code points from assorted blocks (no surrogates, no U+2581)
    lo, hi = rng.choice([(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
                         (0x900, 0x97F), (0xE00, 0xE7F), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF)])
    return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8)))


def parity_strings(n: int = 600, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "  ", "\n", "\t", "\r\n", "Hello world", " leading space", "trailing space ", "12345", "a" * 200]
    out += [" " * k for k in range(1, 41)] + [f"x{' ' * k}y" for k in range(1, 41)]
    out += [w for ws in WORDS.values() for w in ws[:2]] + EMOJI + CODE + CONTROL_TEXT
    while len(out) < n:
        s = "".join(_fragment(rng) + rng.choice(["", " ", "\n"]) for _ in range(rng.randint(1, 5)))
        if rng.random() < 0.15:
            s = rng.choice(CONTROL_TEXT) + s if rng.random() < 0.5 else s + rng.choice(CONTROL_TEXT)
        out.append(s)
    return out


def has_control_text(s: str) -> bool:
    return any(t in s for t in ("<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<start_of", "<end_of", "<unused"))


# ---- real Gemma 3 270M vocabulary -----------------------------------------------------------


# `gguf_path` and `hf_gguf_tokenizer` (transformers' tokenizer of the same file, slow to build) are
# session fixtures in conftest.py.


@pytest.fixture(scope="module")
def gemma(gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf_gemma(hf_gguf_tokenizer):
    return hf_gguf_tokenizer


@pytest.mark.real_model
def test_gguf_vocabulary_has_gemma3_special_ids(gguf_path: Path, gemma: Tokenizer) -> None:
    tok = Tokenizer.from_gguf(gguf_path)
    assert tok.fingerprint() == gemma.fingerprint()
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert (tok.start_of_turn_id, tok.end_of_turn_id, tok.vocab_size) == (105, 106, 262144)
    assert tok.stop_ids == (1, 106)
    assert tok.id_of("\n") == 107 and tok.piece(138) == "\u2581\u2581"  # whitespace piece restored to U+2581
    with pytest.raises(TokenizerError):
        tok.id_of("definitely-not-a-piece")


@pytest.mark.real_model
def test_encode_matches_transformers_on_varied_strings(gemma: Tokenizer, hf_gemma) -> None:
    strings = parity_strings()
    assert len(strings) >= 500
    expected = hf_gemma(strings)["input_ids"]
    mismatches, long_runs = [], 0
    for s, want in zip(strings, expected):
        got = gemma.encode(s)
        if s.startswith("<bos>"):
            assert want[:2] == [2, 2]  # transformers adds a second BOS; we deliberately do not
            want = want[1:]
        if LONG_SPACE_RUN.search(s):
            # Known SentencePiece/transformers difference (see test_long_space_runs_follow_sentencepiece):
            # only the split of the space run may differ, every other piece must be the same.
            long_runs += 1
            assert gemma.decode(got) == hf_gemma.decode(want)
            if _non_space_pieces(gemma, got) == _non_space_pieces(gemma, want):
                continue
        if got != want:
            mismatches.append(f"{s!r}\n  ours: {got}\n  hf:   {want}")
    assert not mismatches, f"{len(mismatches)} mismatches:\n" + "\n".join(mismatches[:20])
    assert long_runs < len(strings) // 10  # the exact comparison covers almost all strings


LONG_SPACE_RUN = re.compile(" {32,}")  # longer than Gemma's longest whitespace piece (31 spaces)


def _non_space_pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [p for p in (tok.piece(i).lstrip("\u2581") for i in ids) if p]


@pytest.mark.real_model
def test_long_space_runs_follow_sentencepiece(gemma: Tokenizer, hf_gemma) -> None:
    """Runs of spaces are user-defined pieces of 2..31 spaces (ids 138..167).

    SentencePiece (like llama.cpp) matches user-defined pieces whole, longest first, so 32 spaces are
    31 + 1. transformers' GGUF converter turns them into ordinary BPE pieces with merges rebuilt from
    the vocabulary order, so it merges pairs upwards and stops at 16 + 16. Both decode to the same
    text; we keep SentencePiece's (the reference implementation's) behaviour.
    """
    for k in range(2, 32):
        assert gemma.encode(" " * k, bos=False) == [136 + k] == hf_gemma(" " * k, add_special_tokens=False)["input_ids"]
    s = "x" + " " * 32 + "y"
    x, y, sp_y = gemma.id_of("x"), gemma.id_of("y"), gemma.id_of("\u2581y")
    assert gemma.encode(s, bos=False) == [x, 167, sp_y]
    assert hf_gemma(s, add_special_tokens=False)["input_ids"] == [x, 152, 152, y]
    assert gemma.decode([x, 167, sp_y]) == hf_gemma.decode([x, 152, 152, y]) == s


@pytest.mark.real_model
def test_decode_round_trips_and_matches_transformers(gemma: Tokenizer, hf_gemma) -> None:
    bad = []
    for s in parity_strings():
        ids = gemma.encode(s)
        if not has_control_text(s) and gemma.decode(gemma.encode(s, bos=False)) != s:
            bad.append(f"round trip {s!r}: {gemma.decode(gemma.encode(s, bos=False))!r}")
        if not has_control_text(s) and gemma.decode(ids, skip_special=True) != s:
            bad.append(f"skip_special {s!r}")
        if gemma.decode(ids) != hf_gemma.decode(ids):
            bad.append(f"decode {s!r}: ours {gemma.decode(ids)!r} hf {hf_gemma.decode(ids)!r}")
        if gemma.decode(ids, skip_special=True) != hf_gemma.decode(ids, skip_special_tokens=True):
            bad.append(f"decode(skip) {s!r}")
    assert not bad, "\n".join(bad[:20])


def _has_invalid_byte_run(tok: Tokenizer, ids: list[int]) -> bool:
    run: list[int] = []
    for i in ids + [-1]:
        piece = tok.piece(i) if i >= 0 else ""
        if len(piece) == 6 and piece.startswith("<0x"):
            run.append(int(piece[3:5], 16))
            continue
        if run:
            try:
                bytes(run).decode("utf-8")
            except UnicodeDecodeError:
                return True
        run = []
    return False


@pytest.mark.real_model
def test_decode_random_ids_matches_transformers(gemma: Tokenizer, hf_gemma) -> None:
    """Arbitrary id sequences (as a sampler may emit) decode like transformers, except invalid UTF-8.

    For a run of byte pieces that is not valid UTF-8, SentencePiece replaces only the bad bytes
    with U+FFFD, while transformers' ByteFallback decoder replaces every byte of the run.
    """
    rng = random.Random(7)
    byte_ids = range(gemma.id_of("<0x00>"), gemma.id_of("<0xFF>") + 1)
    checked = 0
    for _ in range(1000):
        ids = [rng.choice([rng.choice(byte_ids), rng.randrange(gemma.vocab_size), rng.randint(138, 167), 2, 105])
               for _ in range(rng.randint(1, 12))]
        if gemma.decode(ids) != hf_gemma.decode(ids) and _has_invalid_byte_run(gemma, ids):
            continue
        assert gemma.decode(ids) == hf_gemma.decode(ids), ids
        kept = [i for i in ids if i not in (2, 105)]
        if not _has_invalid_byte_run(gemma, kept):
            assert gemma.decode(ids, skip_special=True) == hf_gemma.decode(ids, skip_special_tokens=True), ids
        checked += 1
    assert checked > 500
    bad, slash = gemma.id_of("<0x9B>"), gemma.id_of("<0x2F>")
    assert gemma.decode([bad, slash]) == "\ufffd/" and hf_gemma.decode([bad, slash]) == "\ufffd\ufffd"


@pytest.mark.real_model
def test_parse_special_and_bos(gemma: Tokenizer) -> None:
    s = "<start_of_turn>user\nhi<end_of_turn>"
    assert gemma.encode(s)[:2] == [2, 105] and 106 in gemma.encode(s)
    plain = gemma.encode(s, parse_special=False)
    assert 105 not in plain and 106 not in plain
    assert gemma.decode(plain, skip_special=True) == s  # plain pieces, so nothing is skipped
    assert gemma.encode("<bos>hi") == [2] + gemma.encode("hi", bos=False)  # no second BOS
    assert gemma.encode("<bos>hi", bos=False) == gemma.encode("<bos>hi")
    assert gemma.encode("<bos>hi", parse_special=False).count(2) == 1
    assert gemma.encode("", bos=False) == [] and gemma.encode("") == [2]
    assert gemma.decode([2, 105, 106, 1], skip_special=True) == ""
    with pytest.raises(TokenizerError):
        gemma.decode([262144])


@pytest.mark.real_model
def test_thousands_of_control_tokens_are_each_one_id(gemma: Tokenizer) -> None:
    # The GGUF has ~6k control pieces (<unusedN>, image tokens...); each is matched whole, anywhere.
    for i in range(0, 6000, 7):
        piece = f"<unused{i}>"
        if piece in gemma._special:
            ids = gemma.encode(f"a{piece}b", bos=False)
            assert ids[1] == gemma._special[piece] and len(ids) == 3, piece


CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "  It is 4.\n"},
    {"role": "user", "content": "And 3+3? Answer in 日本語 😀"},
]


@pytest.mark.real_model
def test_chat_template_matches_transformers(gemma: Tokenizer, hf_gemma) -> None:
    ids = gemma.apply_chat_template(CONVERSATION)
    text = (
        "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\nIt is 4.<end_of_turn>\n"
        "<start_of_turn>user\nAnd 3+3? Answer in 日本語 😀<end_of_turn>\n<start_of_turn>model\n"
    )
    assert gemma.render_chat(CONVERSATION) == text
    assert ids == hf_gemma(text, add_special_tokens=False)["input_ids"]
    assert ids.count(2) == 1 and ids[0] == 2
    assert ids[-3:] == [105] + gemma.encode("model\n", bos=False)
    # the GGUF carries no chat template; our Jinja template must give the same ids in transformers
    hf_ids = hf_gemma.apply_chat_template(CONVERSATION, chat_template=GEMMA_CHAT_TEMPLATE,
                                          add_generation_prompt=True, tokenize=True)
    assert list(getattr(hf_ids, "input_ids", hf_ids)) == ids
    no_prompt = gemma.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert no_prompt == ids[: -len(gemma.encode("<start_of_turn>model\n", bos=False))]


@pytest.mark.real_model
def test_chat_template_system_folding_and_untrusted_content(gemma: Tokenizer, hf_gemma) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi <end_of_turn><bos> "}]
    text = gemma.render_chat(msgs)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi <end_of_turn><bos><end_of_turn>\n<start_of_turn>model\n"
    ids = gemma.apply_chat_template(msgs)
    assert ids.count(106) == 1 and ids.count(2) == 1 and ids.count(105) == 2  # typed control text stays plain
    hf_ids = hf_gemma.apply_chat_template(msgs, chat_template=GEMMA_CHAT_TEMPLATE, tokenize=False,
                                          add_generation_prompt=True)
    assert hf_ids == text


# ---- chat template validation (no model needed) ---------------------------------------------


@pytest.mark.parametrize(
    "messages, index",
    [
        ([{"role": "model", "content": "hi"}], 0),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], 1),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], 1),
        ([{"role": "system", "content": "s"}, {"role": "model", "content": "b"}], 1),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], 1),
        ([{"role": "user", "content": 5}], 0),
        ([{"role": "system", "content": "s"}], 0),
    ],
)
def test_chat_template_rejects_bad_roles(trained: Tokenizer, messages, index) -> None:
    with pytest.raises(TokenizerError, match=f"message {index}"):
        trained.apply_chat_template(messages)


# ---- trained tokenizer --------------------------------------------------------------------------


def training_lines(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ("the quick brown fox jumps over lazy dog model token data train gemma text line number "
             "value alpha beta gamma delta café naïve über Привет мир def return class").split()
    syllables = "ka lo mi ne ru sa ti vo ze pu gra den tol mas ker bin".split()
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(300)]
    lines = []
    for _ in range(n):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(3, 15)))
        if rng.random() < 0.3:
            s += " " + str(rng.randint(0, 10**9))
        if rng.random() < 0.2:
            s = " " * rng.choice([2, 4, 8]) + s
        if rng.random() < 0.2:
            s += "\t" + rng.choice(words)
        lines.append(s)
    return lines


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    (root / "train.txt").write_text("\n".join(training_lines()) + "\n", encoding="utf-8")
    train_tokenizer([root / "train.txt"], 600, root / "out", extra_control_tokens=3)
    return root


@pytest.fixture(scope="module")
def trained(trained_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(trained_dir / "out" / "tokenizer.model")


def test_trained_special_ids_and_files(trained: Tokenizer, trained_dir: Path) -> None:
    assert (trained.pad_id, trained.eos_id, trained.bos_id, trained.unk_id) == (0, 1, 2, 3)
    assert trained.vocab_size == 600
    assert [trained.piece(i) for i in range(4, 10)] == [
        "<mask>", "<start_of_turn>", "<end_of_turn>", "<unused0>", "<unused1>", "<unused2>"]
    assert trained.stop_ids == (1, trained.end_of_turn_id)
    out = trained_dir / "out"
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["chat_template"] == GEMMA_CHAT_TEMPLATE
    assert json.loads((out / "special_tokens_map.json").read_text())["bos_token"] == "<bos>"


def test_trained_splits_digits(trained: Tokenizer) -> None:
    ids = trained.encode("12345", bos=False)
    assert [trained.piece(i) for i in ids] == list("12345")
    ids = trained.encode("number 9876543210", bos=False)
    assert [trained.piece(i) for i in ids][-10:] == list("9876543210")


def test_trained_keeps_whitespace(trained: Tokenizer) -> None:
    for s in ["  the", "the    fox", "a\t\tb", "x\n\ny", " " * 40, "\r\n", "trailing   "]:
        assert trained.decode(trained.encode(s, bos=False)) == s
    assert trained.encode("the fox", bos=False) != trained.encode("the  fox", bos=False)
    assert not trained.piece(trained.encode("the", bos=False)[0]).startswith("\u2581")  # no dummy prefix


def test_trained_byte_fallback(trained: Tokenizer) -> None:
    for s in ["漢", "😀", "\x00", "ﬁ"]:  # not in the training data (and no NFKC folding of "ﬁ")
        ids = trained.encode(s, bos=False)
        assert ids and all(trained.piece(i).startswith("<0x") for i in ids)
        assert len(ids) == len(s.encode("utf-8")) and trained.unk_id not in ids
        assert trained.decode(ids) == s
    assert trained.decode(trained.encode("café 漢字 naïve", bos=False)) == "café 漢字 naïve"


UNICODE_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\u2581"), max_size=60)
SPECIAL_TEXT = st.sampled_from(["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<unused1>", "<", "  ", "\n"])


@settings(deadline=None, max_examples=200, derandomize=True)
@given(st.lists(st.one_of(UNICODE_TEXT, SPECIAL_TEXT), max_size=4).map("".join))
def test_trained_round_trip_property(trained: Tokenizer, s: str) -> None:
    # lone surrogates cannot be encoded at all; U+2581 reads as a space (see test_u2581_is_read_as_space)
    assert trained.decode(trained.encode(s, bos=False)) == s
    assert trained.decode(trained.encode(s, parse_special=False), skip_special=True) == s


def test_u2581_is_read_as_space(trained: Tokenizer) -> None:
    # SentencePiece (and transformers) escape spaces as U+2581, so a literal U+2581 decodes as a space.
    assert trained.decode(trained.encode("a\u2581b", bos=False)) == "a b"


def test_save_and_reload_identical(trained: Tokenizer, tmp_path: Path) -> None:
    trained.save(tmp_path)
    again = Tokenizer.from_file(tmp_path / "tokenizer.model")
    assert again.fingerprint() == trained.fingerprint()
    assert Tokenizer.from_file(tmp_path).fingerprint() == trained.fingerprint()  # directory works too
    proto = Tokenizer.from_proto((tmp_path / "tokenizer.model").read_bytes())
    assert pickle.loads(pickle.dumps(trained)).fingerprint() == trained.fingerprint()
    for s in training_lines(50, seed=7) + ["<start_of_turn>user\nhi<end_of_turn>", "漢字 😀 12"]:
        assert again.encode(s) == trained.encode(s) == proto.encode(s)


def test_saved_tokenizer_loads_in_transformers(trained: Tokenizer, trained_dir: Path) -> None:
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(str(trained_dir / "out"))
    strings = training_lines(20, seed=3) + [
        "12345 the quick", "    the   fox\t\tx", "日本 😀", "a\r\nb\n\n c", "café  ",
        "<start_of_turn>user\nhi<end_of_turn>", "x <eos> <unused1>", "<unk>?",
    ]
    for s in strings:
        assert hf(s)["input_ids"] == trained.encode(s), s
        ids = trained.encode(s)
        assert hf.decode(ids) == trained.decode(ids), s
        assert hf.decode(ids, skip_special_tokens=True) == trained.decode(ids, skip_special=True), s
    msgs = [{"role": "system", "content": "Be nice."}] + CONVERSATION
    hf_ids = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    assert list(getattr(hf_ids, "input_ids", hf_ids)) == trained.apply_chat_template(msgs)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (2, 1, 0, 3)


def test_train_from_jsonl_gz(tmp_path: Path) -> None:
    docs = ["\n".join(training_lines(8, seed=i)) for i in range(60)]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    tok = train_tokenizer([tmp_path / "d.jsonl.gz"], 400, tmp_path / "out", max_sentence_length=512)
    assert (tmp_path / "out" / "tokenizer.model").is_file()
    assert tok.decode(tok.encode(docs[0], bos=False)) == docs[0]


def test_sampled_training_is_reproducible(tmp_path: Path) -> None:
    """The same texts and seed give the same model bytes (SentencePiece's own sampling is unseeded: two runs of
    the data pipeline made different tokenizers, hence different token shards); another seed samples others."""
    (tmp_path / "t.txt").write_text("\n".join(training_lines(3000, seed=7)) + "\n")

    def model_bytes(name: str, seed: int) -> bytes:
        train_tokenizer([tmp_path / "t.txt"], 400, tmp_path / name, input_sentence_size=300, seed=seed)
        return (tmp_path / name / "tokenizer.model").read_bytes()

    first = model_bytes("a", seed=0)
    assert model_bytes("b", seed=0) == first
    assert model_bytes("c", seed=1) != first


def test_training_sample_is_uniform_and_in_input_order() -> None:
    from gemmalab.tokenizer import _sample

    texts = [f"t{i}" for i in range(1000)]
    picked = _sample(iter(texts), 100, seed=3)
    assert len(picked) == 100 and len(set(picked)) == 100
    assert picked == sorted(picked, key=lambda t: int(t[1:]))  # input order
    assert _sample(iter(texts), 100, seed=3) == picked and _sample(iter(texts), 100, seed=4) != picked
    assert _sample(iter(texts[:50]), 100, seed=3) == texts[:50]  # fewer than k: all
    # uniform: each text is picked with probability k / n = 0.1; over 200 seeds, the first and last hundred
    # texts are picked about equally often
    counts = [0] * 1000
    for seed in range(200):
        for t in _sample(iter(texts), 100, seed=seed):
            counts[int(t[1:])] += 1
    first, last = sum(counts[:100]), sum(counts[-100:])
    assert abs(first - 2000) < 250 and abs(last - 2000) < 250


@settings(deadline=None, max_examples=100, derandomize=True)
@given(st.lists(st.sampled_from(["a", "é", "😀", "\n", "\r\n", " ", "b" * 70]), max_size=200).map("".join))
def test_long_training_texts_are_cut_at_line_boundaries(text: str) -> None:
    from gemmalab.tokenizer import _chunk

    chunks = list(_chunk(text, 64))
    assert "".join(chunks) == text
    assert all(0 < len(c.encode("utf-8")) <= 64 for c in chunks)


def test_gguf_parser_agrees_with_gguf_reader(trained: Tokenizer, tmp_path: Path) -> None:
    """A GGUF written from the trained vocabulary (spaces literal, as llama.cpp writes them) loads back identically."""
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    pieces = [trained.piece(i) for i in range(trained.vocab_size)]
    w.add_tokenizer_model("llama")
    w.add_token_list([p if p.startswith("<0x") else p.replace("\u2581", " ") for p in pieces])
    w.add_token_scores([float(trained._sp.get_score(i)) for i in range(trained.vocab_size)])
    types = [3 if trained._sp.is_control(i) else 6 if trained._sp.is_byte(i) else 2 if trained._sp.is_unknown(i) else 1
             for i in range(trained.vocab_size)]
    w.add_token_types(types)
    w.add_bos_token_id(2), w.add_eos_token_id(1), w.add_unk_token_id(3), w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    fast = Tokenizer.from_gguf(path)
    assert fast.fingerprint() == Tokenizer.from_gguf(gguf.GGUFReader(path)).fingerprint()
    for s in training_lines(30, seed=5) + ["  x   y", "<start_of_turn>user\n漢<end_of_turn>"]:
        assert fast.encode(s) == trained.encode(s)


# ---- bad input ------------------------------------------------------------------------------


def test_missing_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(TokenizerError, match="nope"):
        Tokenizer.from_file(missing)
    with pytest.raises(GemmalabError, match="nope"):  # file-level GGUF errors come from the shared reader
        Tokenizer.from_gguf(tmp_path / "nope.gguf")
    with pytest.raises(TokenizerError, match="nope"):
        train_tokenizer([tmp_path / "nope.txt"], 400, tmp_path / "out")


def test_corrupt_model_errors(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(TokenizerError, match=str(bad)):
        Tokenizer.from_file(bad)
    with pytest.raises(GemmalabError, match="not a readable GGUF"):
        Tokenizer.from_gguf(bad)


def test_gguf_without_tokenizer_errors(tmp_path: Path) -> None:
    path = tmp_path / "notok.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(1)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    with pytest.raises(TokenizerError, match=f"{path}.*tokenizer.ggml.model"):
        Tokenizer.from_gguf(path)
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf(gguf.GGUFReader(path))
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(path.read_bytes()[:30])
    with pytest.raises(GemmalabError, match="trunc.gguf"):
        Tokenizer.from_gguf(truncated)


def test_training_errors(tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("tiny corpus\n")
    with pytest.raises(TokenizerError, match="small.txt"):
        train_tokenizer([small], 5000, tmp_path / "out")
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer([small], 100, tmp_path / "out")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(TokenizerError, match="no text"):
        train_tokenizer([empty], 400, tmp_path / "out")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"txt": 1}\n')
    with pytest.raises(TokenizerError, match="bad.jsonl, line 1"):
        train_tokenizer([bad_jsonl], 400, tmp_path / "out")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TokenizerError, match="bin.txt"):
        train_tokenizer([binary], 400, tmp_path / "out")


def test_lone_surrogates_are_a_clear_error(trained: Tokenizer) -> None:
    """Text decoded from JSON may hold "\\ud800": SentencePiece cannot take it; the error names where it is."""
    with pytest.raises(TokenizerError, match=r"lone surrogate \(U\+D800\) at character 3"):
        trained.encode("ka \ud800 lo")
    with pytest.raises(TokenizerError, match="U\\+DFFF"):
        trained.apply_chat_template([{"role": "user", "content": "\udfff"}])
    assert trained.encode("ka \U0001F600 lo")  # a proper astral character is fine
