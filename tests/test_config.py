"""The one config API (gemmalab.config): every stage config loads from TOML with overrides, refuses what is wrong
naming the file and the key, resolves its values once, and its snapshot loads back to the same config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from gemmalab.config import dump, from_table, load, to_toml
from gemmalab.data.config import DataConfig
from gemmalab.data.mixture import Mixture
from gemmalab.errors import GemmalabError
from gemmalab.model.config import ModelConfig
from gemmalab.train.pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    rate: float = 0.5
    rule: int | None = 3

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise GemmalabError(f"`rate` must be >= 0, got {self.rate}")


@dataclass
class Outer:
    name: str = "x"
    dtype: torch.dtype = torch.float32
    sizes: tuple[int, int] = (1, 2)
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)
    table: dict[str, float] = field(default_factory=dict)


def test_types_are_checked_and_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "y"\ndtype = "bfloat16"\nsizes = [3, 4]\n[inner]\nrate = 1\n[[items]]\nrule = false\n')
    cfg = load(Outer, path)
    assert cfg == Outer("y", torch.bfloat16, (3, 4), Inner(1.0, 3), [Inner(0.5, None)])
    assert load(Outer, path, ["dtype=bf16", "inner.rule=7"]).inner.rule == 7  # either dtype spelling
    for text, message in [("nme = 1", r"c\.toml: unknown key `nme`"),
                          ("[inner]\nrte = 1", r"unknown key `inner.rte`"),
                          ("sizes = [1]", r"`sizes` must be tuple\[int, int\]"),
                          ("dtype = 'int8'", r"`dtype` must be one of fp32, float32, bf16"),
                          ("[inner]\nrate = -1", r"c\.toml: `inner.rate` must be >= 0, got -1"),
                          ("[[items]]\nrate = 'a'", r"`items\[0\].rate` must be float"),
                          ("table = { a = 'b' }", r"`table.a` must be float")]:
        path.write_text(text)
        with pytest.raises(GemmalabError, match=message):
            load(Outer, path)
    with pytest.raises(GemmalabError, match=r"command-line overrides.*`inner.rate` must be float"):
        load(Outer, None, ["inner.rate=fast"])
    with pytest.raises(GemmalabError, match="config file not found"):
        load(Outer, tmp_path / "missing.toml")
    path.write_bytes(b'name = "caf\xe9"\n')  # Latin-1, not UTF-8: a named error, not a UnicodeDecodeError traceback
    with pytest.raises(GemmalabError, match=r"c\.toml: not UTF-8 text \(byte 0xe9 at offset 11\)"):
        load(Outer, path)


def test_values_too_big_or_deep_for_the_toml_parser_are_named(tmp_path):
    """An integer over Python's 4,300 digits and arrays nested 5,000 deep: named errors (they were a ValueError and a
    RecursionError traceback), in a file and in a key=value override."""
    path = tmp_path / "c.toml"
    for text, message in [("name = " + "9" * 5000, r"c\.toml: invalid TOML: Exceeds the limit \(4300 digits\)"),
                          ("name = " + "[" * 5000 + "]" * 5000, r"c\.toml: invalid TOML here: nested too deeply")]:
        path.write_text(text)
        with pytest.raises(GemmalabError, match=message):
            load(Outer, path)
    for override in ("inner.rule=" + "9" * 5000, "inner.rule=" + "[" * 5000 + "]" * 5000):
        with pytest.raises(GemmalabError, match=r"`inner.rule` must be"):  # read as a string, then type-checked
            load(Outer, None, [override])


def test_snapshot_loads_back_to_the_same_config(tmp_path):
    cfg = Outer("z", torch.bfloat16, (5, 6), Inner(2.0, None), [Inner(), Inner(0.0, None)], {"a": 1.0})
    assert load(Outer, dump(cfg, tmp_path / "c.toml")) == cfg
    assert "rule = false" in to_toml(cfg)  # None where the default is not: written as false, read back as None

    pre = load(PretrainConfig, ROOT / "configs" / "train" / "tiny.toml", ["train.dtype=bfloat16", "optim.grad_clip=false"])
    tmp_path.joinpath("run").mkdir()
    path = dump(pre, tmp_path / "run")
    assert path == tmp_path / "run" / "config.toml"
    back = load(PretrainConfig, path)
    assert back == pre and back.optim.grad_clip is None and back.train.dtype == torch.bfloat16
    data = load(DataConfig, ROOT / "configs" / "data" / "builtin.toml", ["executor.tasks=3"])
    assert load(DataConfig, dump(data, tmp_path / "data.toml")) == data


def test_stage_configs_resolve_once_to_typed_values():
    cfg = load(PretrainConfig, ROOT / "configs" / "train" / "tiny.toml", ["train.steps=70"])
    assert isinstance(cfg.model.config, ModelConfig) and cfg.model.config.vocab_size == 8192
    assert isinstance(cfg.data.mixture, Mixture) and len(cfg.data.mixture.stages) == 2
    assert cfg.train.dtype is torch.float32
    assert cfg.optim.total_steps == 70  # the schedule spans the run unless told otherwise
    assert load(PretrainConfig, None, ["optim.total_steps=50"]).optim.total_steps == 50
    with pytest.raises(GemmalabError, match=r"`data.seq_len` \(4096\) exceeds the model's max_seq_len"):
        load(PretrainConfig, None, ["data.seq_len=4096", "model.max_seq_len=128"])
    with pytest.raises(GemmalabError, match=r"\[data.mixture\] mixture: the last stage must have until = 1.0"):
        load(PretrainConfig, None, ['data.mixture={stages=[{until=0.5, weights={a=1}}]}'])
    with pytest.raises(GemmalabError, match=r"unknown key `model.layers`"):
        load(PretrainConfig, None, ["model.layers=3"])
    with pytest.raises(GemmalabError, match=r"\[model\] Unknown model preset .gemma-99b."):
        load(PretrainConfig, None, ["model.preset=gemma-99b"])


def test_data_config_refuses_values_no_stage_could_run_with():
    base = {"inputs": [{"path": "x"}]}
    for extra, message in [({"executor": {"kind": "k8s"}}, r"`executor.kind` = 'k8s'; choose one of local, ray, slurm"),
                           ({"pii": {"mode": "mask"}}, r"`pii.mode` = 'mask'"),
                           ({"decontamination": {"mode": "cut"}}, r"`decontamination.mode` = 'cut'"),
                           ({"source_kinds": {"web": "poetry"}}, r"`source_kinds`.web = 'poetry'"),
                           ({"tokenizer": "no/such/tokenizer"}, r"`tokenizer` = 'no/such/tokenizer': no such file"),
                           ({"inputs": []}, r"no \[\[inputs\]\]"),
                           ({"inputs": [{"glob": "*"}]}, r"d\.toml: an input needs `inputs\[0\]\.path` or `builtin = true`")]:
        with pytest.raises(GemmalabError, match=message):
            from_table(DataConfig, {**base, **extra}, "d.toml")


@pytest.mark.real_model
def test_init_from_a_gguf_resolves_its_config_from_the_metadata(gguf_path, real_model, tmp_path):
    """[model] init_from a GGUF file: its config comes from the file's metadata, without reading the weights (the
    weights load through gemmalab.load, as tests/test_train_objective.py checks for a model directory)."""
    cfg = load(PretrainConfig, None, [f'model.init_from="{gguf_path}"', "model.max_seq_len=1024"])
    reference, _ = real_model
    assert cfg.model.config == reference.config.replace(max_seq_len=1024)
    assert dump(cfg, tmp_path / "c.toml").read_text().count("init_from") == 1
