"""Fuzzing (hypothesis, derandomized): the tokenizer, chat rendering and the file readers on arbitrary input give a
result or a clear error (GemmalabError, of which TokenizerError is one), never another exception and never a hang.

Targets: encode/decode (any text, lone surrogates included; any ids), apply_chat_template and friends (any roles and
contents), the JSONL reader (plain and gzip bytes), config TOML (raw bytes, and real configs with mutated values),
the GGUF header reader with the model config and vocabulary read from it (structured headers with hostile counts,
types and lengths, then cut or corrupted), config.json (any JSON objects over the real keys) and task TOML specs
and templates. Each crash found is kept as an @example.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gemmalab.errors import GemmalabError

ROOT = Path(__file__).resolve().parents[2]
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def outcome(fn, *args, **kwargs):
    """What `fn` returns, or the GemmalabError it raises (with a message); any other exception fails the test."""
    try:
        return fn(*args, **kwargs)
    except GemmalabError as e:
        assert str(e).strip()
        return e


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ---- the tokenizer and chat rendering ---------------------------------------------------------------------------

ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=80)  # surrogates too
SPECIALS = st.sampled_from(["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>", "\n", " ", "\u2581"])
TEXT = st.one_of(ANY_TEXT, st.lists(st.one_of(ANY_TEXT, SPECIALS), max_size=6).map("".join))


def _has_surrogate(s: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in s)


@FUZZ
@given(text=TEXT, bos=st.booleans(), parse_special=st.booleans())
@example(text="\ud800", bos=True, parse_special=True)
@example(text="<start_of_turn>\udfff<end_of_turn>", bos=False, parse_special=False)
def test_encode_and_decode_any_text(tiny_tokenizer, text, bos, parse_special):
    ids = outcome(tiny_tokenizer.encode, text, bos=bos, parse_special=parse_special)
    if _has_surrogate(text):
        assert isinstance(ids, GemmalabError) and "lone surrogate" in str(ids)
        return
    assert isinstance(ids, list) and all(0 <= i < tiny_tokenizer.vocab_size for i in ids)
    assert isinstance(tiny_tokenizer.decode(ids), str)


@FUZZ
@given(ids=st.lists(st.one_of(st.integers(-3, 520), st.integers(-2**70, 2**70)), max_size=40),
       skip_special=st.booleans())
@example(ids=[2**64], skip_special=False)
def test_decode_any_ids(tiny_tokenizer, ids, skip_special):
    text = outcome(tiny_tokenizer.decode, ids, skip_special=skip_special)
    assert isinstance(text, str) == all(0 <= i < tiny_tokenizer.vocab_size for i in ids)


ROLE = st.one_of(st.sampled_from(["system", "user", "model", "assistant"]), st.text(max_size=8), st.integers(),
                 st.none(), st.lists(st.text(max_size=2), max_size=2))
CONTENT = st.one_of(TEXT, st.integers(), st.none(), st.lists(st.text(max_size=4), max_size=2),
                    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
MESSAGE = st.one_of(st.fixed_dictionaries({"role": ROLE, "content": CONTENT}),
                    st.dictionaries(st.sampled_from(["role", "content", "name"]), CONTENT, max_size=3),
                    st.text(max_size=5), st.integers(), st.none())
MESSAGES = st.one_of(st.lists(MESSAGE, max_size=6), st.text(max_size=5), st.integers(), st.none(),
                     st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2), st.tuples(MESSAGE))


@FUZZ
@given(messages=MESSAGES, add_generation_prompt=st.booleans())
@example(messages=5, add_generation_prompt=True)
@example(messages={"role": "user", "content": "hi"}, add_generation_prompt=True)
@example(messages=[{"role": ["user"], "content": "hi"}], add_generation_prompt=False)
def test_chat_rendering_of_any_messages(tiny_tokenizer, messages, add_generation_prompt):
    ids = outcome(tiny_tokenizer.apply_chat_template, messages, add_generation_prompt)
    text = outcome(tiny_tokenizer.render_chat, messages, add_generation_prompt)
    both = outcome(tiny_tokenizer.chat_ids_and_mask, messages, add_generation_prompt)
    assert isinstance(ids, list) == isinstance(both, tuple)
    if isinstance(both, tuple):
        assert both[0] == ids and len(both[1]) == len(ids) and ids[0] == tiny_tokenizer.bos_id
        assert isinstance(text, str)


CLEAN_TEXT = st.text(max_size=60)  # no surrogates: st.text leaves them out


@FUZZ
@given(system=st.one_of(st.none(), CLEAN_TEXT), turns=st.lists(CLEAN_TEXT, min_size=1, max_size=5),
       assistant=st.booleans())
def test_well_formed_dialogues_always_render(tiny_tokenizer, system, turns, assistant):
    """Alternating user/model turns with any (valid) text: a result, with one BOS and a mask as long as the ids."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages += [{"role": "user" if i % 2 == 0 else ("assistant" if assistant else "model"), "content": t}
                 for i, t in enumerate(turns)]
    ids, mask = tiny_tokenizer.chat_ids_and_mask(messages)
    assert ids.count(tiny_tokenizer.bos_id) >= 1 and ids[0] == tiny_tokenizer.bos_id and len(mask) == len(ids)


# ---- JSONL ------------------------------------------------------------------------------------------------------

JSON_VALUE = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
                          lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                  st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                          max_leaves=10)
JSONL_LINE = st.one_of(JSON_VALUE.map(json.dumps), st.text(max_size=30),
                       st.sampled_from(['{"text": "\\ud800"}', "{", "[" * 2000, '{"a": ' + "9" * 5000 + "}", ""]))
JSONL_BYTES = st.one_of(st.binary(max_size=300),
                        st.lists(JSONL_LINE, max_size=8).map(lambda lines: "\n".join(lines).encode("utf-8",
                                                                                                "surrogatepass")))


@FUZZ
@given(data=JSONL_BYTES, compress=st.sampled_from(["none", "gzip", "gzip-cut", "gzip-garbage"]))
@example(data=b'{"a": 1}\n\xff\xfe\n', compress="none")
@example(data=b'{"a": 1}\n' * 50, compress="gzip-cut")
def test_jsonl_reader_on_any_bytes(scratch, data, compress):
    from gemmalab.files import jsonl_lines, read_jsonl

    name = "f.jsonl" if compress == "none" else "f.jsonl.gz"
    if compress == "gzip":
        data = gzip.compress(data)
    elif compress == "gzip-cut":
        data = gzip.compress(data)[: max(1, len(gzip.compress(data)) // 2)]
    elif compress == "gzip-garbage":
        data = b"\x1f\x8b" + data
    path = scratch / name
    path.write_bytes(data)
    rows = outcome(lambda: list(read_jsonl(path)))
    assert isinstance(rows, GemmalabError) or all(isinstance(obj, dict) for _, obj in rows)
    for n, obj, problem in jsonl_lines(path, blank_lines=True):  # the counting reader never raises
        assert (obj is None) != (problem is None) and n >= 1


# ---- config TOML ------------------------------------------------------------------------------------------------

@FUZZ
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
@example(data=b"a = " + b"[" * 3000)
@example(data=b"a = " + b"1" * 5000)
@example(data=b'a = "caf\xe9"')
def test_config_reader_on_any_bytes(scratch, data):
    from gemmalab.config import load
    from gemmalab.train.pretrain import PretrainConfig

    path = scratch / "c.toml"
    path.write_bytes(data)
    outcome(load, PretrainConfig, path)


TOML_VALUE = st.recursive(
    st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=8),
              st.sampled_from(["bf16", "fp32", "cpu", "local", "cosine", "", "runs/x"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text("abcxyz_", min_size=1, max_size=4),
                                                                         inner, max_size=2)),
    max_leaves=6)


def _leaves(table: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in table.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += _leaves(v, prefix + (k,))
    return out


def _configs() -> dict[str, tuple[type, Path]]:
    from gemmalab.data.config import DataConfig
    from gemmalab.recipe import RecipeConfig
    from gemmalab.train.pretrain import PretrainConfig

    return {"pretrain": (PretrainConfig, ROOT / "configs/train/tiny.toml"),
            "data": (DataConfig, ROOT / "configs/data/builtin.toml"),
            "recipe": (RecipeConfig, ROOT / "configs/recipes/tiny.toml")}


@FUZZ
@given(which=st.sampled_from(["pretrain", "data", "recipe"]), data=st.data())
def test_real_configs_with_mutated_values(scratch, which, data):
    """A shipped config with up to three values (any key, nested tables too) replaced by any TOML value: the config
    loads or the error names the file; __post_init__ checks never raise TypeError or ValueError of their own."""
    from gemmalab.config import load, to_table, to_toml

    cls, path = _configs()[which]
    table: dict[str, Any] = to_table(load(cls, path))
    for _ in range(data.draw(st.integers(1, 3))):
        *parents, last = data.draw(st.sampled_from(_leaves(table)))
        node = table
        for part in parents:
            node = node[part] if isinstance(node.get(part), dict) else node.setdefault(part, {})
        node[last] = data.draw(TOML_VALUE)
    out = scratch / f"{which}.toml"
    out.write_text(to_toml(table), encoding="utf-8")
    result = outcome(load, cls, out)
    assert not isinstance(result, GemmalabError) or str(out) in str(result)


# ---- GGUF -------------------------------------------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_KEYS = ["general.architecture", "general.alignment", "gemma.block_count", "gemma.embedding_length",
         "gemma.attention.head_count", "gemma.feed_forward_length", "gemma.context_length", "gemma3.block_count",
         "gemma3.embedding_length", "gemma3.attention.head_count", "gemma3.feed_forward_length",
         "gemma3.context_length", "gemma3.attention.sliding_window", "gemma3.attention.key_length",
         "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
         "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.bos_token_id"]


def _gguf_string(s: bytes, claimed: int | None = None) -> bytes:
    return struct.pack("<Q", len(s) if claimed is None else claimed) + s


@st.composite
def gguf_value(draw, depth: int = 0) -> tuple[int, bytes]:
    """(type code, payload) of one metadata value: well formed, or with a hostile count or length."""
    kind = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12] if depth < 2 else [4, 6, 8]))
    if kind == 8:
        text = draw(st.binary(max_size=12))
        claimed = draw(st.one_of(st.none(), st.sampled_from([0, 2**31, 2**63, 2**64 - 1])))
        return kind, _gguf_string(text, claimed)
    if kind == 9:
        item = draw(gguf_value(depth=depth + 1))[0]
        items = [draw(gguf_value(depth=depth + 1)) for _ in range(draw(st.integers(0, 4)))]
        items = [payload for t, payload in items if t == item]
        count = draw(st.one_of(st.just(len(items)), st.sampled_from([2**32, 2**60, 2**64 - 1])))
        return kind, struct.pack("<IQ", item, count) + b"".join(items)
    fmt = _SCALARS[kind]
    value = draw(st.booleans() if kind == 7 else st.floats(width=32 if kind == 6 else 64) if kind in (6, 12)
                 else st.integers(*_INT_RANGE[fmt]))
    return kind, struct.pack(fmt, value)


_INT_RANGE = {"<B": (0, 255), "<b": (-128, 127), "<H": (0, 65535), "<h": (-32768, 32767), "<I": (0, 2**32 - 1),
              "<i": (-2**31, 2**31 - 1), "<Q": (0, 2**64 - 1), "<q": (-2**63, 2**63 - 1)}


def _array(item: int, payloads: list[bytes], count: int | None = None) -> bytes:
    return struct.pack("<IQ", item, len(payloads) if count is None else count) + b"".join(payloads)


@st.composite
def plausible_value(draw, key: str) -> tuple[int, bytes]:
    """A value of the type the key holds in a Gemma GGUF (sometimes out of range): deep enough to reach the config
    and vocabulary readers."""
    small = st.sampled_from([0, 1, 2, 4, 8, 64, 2**31, 2**32 - 1])
    if key in ("general.architecture", "tokenizer.ggml.model"):
        return 8, _gguf_string(draw(st.sampled_from(["gemma", "gemma2", "gemma3", "llama", "", "gemma\x00"])).encode())
    if key == "tokenizer.ggml.tokens":
        pieces = draw(st.lists(st.text(max_size=4), max_size=6))
        return 9, _array(8, [_gguf_string(t.encode("utf-8", "surrogatepass")) for t in pieces])
    if key == "tokenizer.ggml.scores":
        return 9, _array(6, [struct.pack("<f", x) for x in draw(st.lists(st.floats(width=32), max_size=6))])
    if key == "tokenizer.ggml.token_type":
        return 9, _array(5, [struct.pack("<i", x) for x in draw(st.lists(st.integers(-1, 7), max_size=6))])
    return 4, struct.pack("<I", draw(small))


def _tensor_info(name: bytes, dims: list[int], kind: int, offset: int) -> bytes:
    return _gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", kind, offset)


def _kv(key: bytes, kind: int, payload: bytes) -> bytes:
    return _gguf_string(key) + struct.pack("<I", kind) + payload


def _gguf(*kvs: bytes, tensors: list[bytes] = ()) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)


@st.composite
def gguf_bytes(draw) -> bytes:
    kvs = []
    for _ in range(draw(st.integers(0, 8))):
        key = draw(st.one_of(st.sampled_from(_KEYS), st.text(max_size=6)))
        kind, payload = draw(st.one_of(plausible_value(key), gguf_value()))
        kind = draw(st.integers(0, 2**32 - 1)) if draw(st.integers(0, 19)) == 0 else kind  # an unknown type code
        kvs.append(_gguf_string(key.encode("utf-8", "surrogatepass")) + struct.pack("<I", kind) + payload)
    n_kv = draw(st.one_of(st.just(len(kvs)), st.sampled_from([0, len(kvs) + 1, 2**63])))
    infos = [_tensor_info(draw(st.sampled_from([b"token_embd.weight", b"output_norm.weight", b"blk.0.attn_q.weight",
                                                b"\xff"])),
                          draw(st.lists(st.sampled_from([0, 1, 4, 8, 32, 2**40]), min_size=0, max_size=3)),
                          draw(st.sampled_from([0, 1, 2, 8, 12, 99])), draw(st.sampled_from([0, 32, 2**50])))
             for _ in range(draw(st.integers(0, 2)))]
    tensors = draw(st.one_of(st.just(len(infos)), st.sampled_from([0, 2**40])))
    magic = draw(st.sampled_from([b"GGUF"] * 12 + [b"GGUX"]))
    version = draw(st.sampled_from([3] * 8 + [2, 1, 2**31]))
    data = magic + struct.pack("<IQQ", version, tensors, n_kv) + b"".join(kvs) + b"".join(infos)
    data += bytes(draw(st.sampled_from([0, 32, 64, 600])))  # tensor data
    cut = draw(st.one_of(st.none(), st.none(), st.integers(0, len(data))))
    return data if cut is None else data[:cut]


@FUZZ
@given(data=st.one_of(gguf_bytes(), st.binary(max_size=120)))
@example(data=b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _gguf_string(b"tokenizer.ggml.tokens") +
         struct.pack("<IIQ", 9, 8, 2**60))
@example(data=b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _gguf_string(b"a") + struct.pack("<I", 8) +
         _gguf_string(b"x", 2**63))
@example(data=b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _gguf_string(b"tokenizer.ggml.tokens") +
         struct.pack("<IIQ", 9, 8, 1) + _gguf_string(b"\xff\xfe"))
@example(data=b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _gguf_string(b"general.architecture") + struct.pack("<I", 8) +
         _gguf_string(b"\x80"))  # found: a UnicodeDecodeError traceback from the config reader
@example(data=_gguf(_kv(b"general.architecture", 9, _array(8, []))))  # found: unhashable list
@example(data=_gguf(_kv(b"general.architecture", 8, _gguf_string(b"gemma")),
                    tensors=[_tensor_info(b"token_embd.weight", [8], 0, 0)]) + bytes(64))  # found: a 1-D embedding
@example(data=_gguf(*[_kv(f"gemma.{k}".encode(), 4, struct.pack("<I", 4)) for k in
                      ("embedding_length", "attention.head_count", "block_count", "feed_forward_length", "context_length")],
                    _kv(b"general.architecture", 8, _gguf_string(b"gemma")),
                    _kv(b"gemma.rope.freq_base", 8, _gguf_string(b"x")),
                    tensors=[_tensor_info(b"token_embd.weight", [4, 2], 0, 0)]) + bytes(64))  # found: float("x")
def test_gguf_header_reader_on_any_bytes(scratch, data):
    from gemmalab.checkpoint.gguf import gguf_config, open_gguf
    from gemmalab.tokenizer import Tokenizer

    path = scratch / "m.gguf"
    path.write_bytes(data)
    reader = outcome(open_gguf, path)
    if isinstance(reader, GemmalabError):
        assert "m.gguf" in str(reader)
        return
    outcome(gguf_config, reader, str(path))
    outcome(Tokenizer.from_gguf, reader)


@FUZZ
@given(tokens=st.lists(st.one_of(st.text(max_size=5), st.integers(0, 9)), max_size=8),
       scores=st.lists(st.one_of(st.floats(width=32), st.integers(0, 9)), max_size=8),
       types=st.lists(st.integers(0, 9), max_size=8), unk=st.one_of(st.integers(-2, 9), st.text(max_size=3)),
       model=st.sampled_from(["llama", "gpt2", ""]))
@example(tokens=["a"], scores=[0.0], types=[9], unk=0, model="llama")
@example(tokens=[1], scores=[0.0], types=[1], unk=0, model="llama")
@example(tokens=["a"], scores=[0.0], types=[1], unk="x", model="llama")
def test_gguf_vocabularies_of_any_shape(scratch, tokens, scores, types, unk, model):
    """Well-formed GGUF files whose tokenizer fields hold the wrong types, lengths or piece types."""
    import gguf

    from gemmalab.tokenizer import Tokenizer

    path = scratch / "v.gguf"
    w = gguf.GGUFWriter(str(path), "gemma")
    w.add_tokenizer_model(model)
    for key, values in (("tokens", tokens), ("scores", scores), ("token_type", types)):
        if values and len({type(v) for v in values}) == 1:  # the writer takes arrays of one type
            w.add_array(f"tokenizer.ggml.{key}", values)
    w.add_string("tokenizer.ggml.unknown_token_id", unk) if isinstance(unk, str) else w.add_int32(
        "tokenizer.ggml.unknown_token_id", unk)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    outcome(Tokenizer.from_gguf, path)


# ---- config.json and task TOML ----------------------------------------------------------------------------------

_HF_KEYS = ["model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings", "rms_norm_eps",
            "rope_theta", "rope_scaling", "rope_parameters", "rope_local_base_freq", "query_pre_attn_scalar",
            "attn_logit_softcapping", "final_logit_softcapping", "sliding_window", "sliding_window_pattern",
            "layer_types", "text_config"]
_GOOD_HF = {"model_type": "gemma3_text", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "intermediate_size": 128}
HF_VALUE = st.one_of(JSON_VALUE, st.sampled_from(["gemma", "gemma2", "gemma3", "gemma3_text", "full_attention",
                                                  "sliding_attention", math.inf, math.nan, -1, 0, 10**9, 2**64]),
                     st.lists(st.sampled_from(["full_attention", "sliding_attention", 1]), max_size=4))


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(_HF_KEYS), HF_VALUE, max_size=4), drop=st.sets(st.sampled_from(list(_GOOD_HF))))
@example(changes={"text_config": [1], "model_type": "gemma3"}, drop=set())
@example(changes={"rope_parameters": "x"}, drop=set())
@example(changes={"num_hidden_layers": 10**9}, drop=set())
def test_hf_config_of_any_values(changes, drop):
    from gemmalab.checkpoint.hf import from_hf_config
    from gemmalab.model import ModelConfig

    cfg = {k: v for k, v in _GOOD_HF.items() if k not in drop} | changes
    result = outcome(from_hf_config, cfg, "config.json")
    assert isinstance(result, (ModelConfig, GemmalabError))


SPEC_FIELDS = ["data", "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter", "fewshot_delimiter",
               "description", "num_fewshot", "fewshot_data", "preprocess", "partial", "name", "shots"]
TEMPLATE = st.one_of(st.text(st.sampled_from("{}%#abcq0123'\"*+-/ |()[]._~"), max_size=30),
                     st.sampled_from(["q", "c", "g", "{{ q }}", "{{ c }}", "{{ g }}", "{{ c[g] }}", "{{ q|upper }}",
                                      "{{ c | regex_replace('x', 'y') }}", "{{ q.__class__ }}", "{{ 'a' * 10**9 }}"]))


@FUZZ
@given(body=st.dictionaries(st.sampled_from(SPEC_FIELDS), st.one_of(TEMPLATE, TOML_VALUE), max_size=6),
       row=st.dictionaries(st.sampled_from(["q", "c", "g"]), JSON_VALUE, max_size=3))
@example(body={"data": "x", "doc_to_text": "q", "doc_to_choice": "c", "doc_to_target": "g", "num_fewshot": "2"},
         row={})
@example(body={"data": "x", "doc_to_text": "{{ q.__class__ }}", "doc_to_choice": "c", "doc_to_target": "g"},
         row={"q": "a", "c": ["x"], "g": 0})
def test_task_specs_and_templates_of_any_values(body, row):
    from gemmalab.evaluate.tasks.choice import _document, _spec

    spec = outcome(_spec, body.pop("name", "fuzz"), body, Path("fuzz.toml"))
    if not isinstance(spec, GemmalabError):
        outcome(_document, spec, row, "fuzz.jsonl, line 1")
