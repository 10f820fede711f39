"""Supervised fine-tuning: the dialogue format and its loss mask, packing, the SFT filters, LoRA, and the stage
(held-out figures, exact resume after kill -9)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gemmalab.config import load
from gemmalab.data.dialogue import DialogueBatches, IGNORE, Example, pack_rows, parse_dialogue, read_dialogues, render, rows_batch
from gemmalab.data.instruct import BuiltinTasks, TASKS, builtin_dialogues, is_correct, make_examples
from gemmalab.data.sft_filters import IdentityConfig, SFTFilterConfig, filter_dialogues, misidentifies
from gemmalab.errors import GemmalabError
from gemmalab.model import Gemma, get_preset
from gemmalab.train.lora import LoRAConfig, apply_lora, load_adapter, merge, save_adapter
from gemmalab.train.sft import SFTConfig, sft

ROOT = Path(__file__).resolve().parents[1]

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "  It is 4.\n"},
     {"role": "user", "content": "And 3+3? Answer in 日本語 😀"}, {"role": "model", "content": "六 (6)."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "model", "content": "Blue"}, {"role": "user", "content": "Another?"},
     {"role": "model", "content": "Green, or\n\nred."}],
]


# ---- the format and its mask ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_tokenizer(gguf_path):
    from gemmalab.checkpoint import load_tokenizer

    return load_tokenizer(gguf_path)


@pytest.mark.real_model
@pytest.mark.parametrize("chat", CHATS, ids=["two-turns", "with-system"])
def test_rendered_ids_are_the_chat_template_and_the_mask_covers_model_turns_only(chat, gemma_tokenizer, hf_gguf_tokenizer):
    from gemmalab.tokenizer import GEMMA_CHAT_TEMPLATE

    tok = gemma_tokenizer
    ex = render(tok, chat, max_tokens=1000)
    hf_ids = hf_gguf_tokenizer.apply_chat_template(chat, chat_template=GEMMA_CHAT_TEMPLATE, tokenize=True,
                                                   add_generation_prompt=False)
    assert ex.ids == list(getattr(hf_ids, "input_ids", hf_ids)) == tok.apply_chat_template(chat, add_generation_prompt=False)
    assert ex.ids.count(tok.bos_id) == 1 and ex.ids[0] == tok.bos_id
    # the masked tokens are, turn by turn, each model answer (trimmed) followed by <end_of_turn>; nothing else
    spans, current = [], []
    for token, trained in zip(ex.ids, ex.mask):
        if trained:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    answers = [m["content"].strip() for m in chat if m["role"] in ("model", "assistant")]
    assert [tok.decode(s[:-1]) for s in spans] == answers
    assert all(s[-1] == tok.end_of_turn_id for s in spans)
    assert sum(ex.mask) == sum(len(s) for s in spans)


def test_dialogue_formats_and_what_render_drops(tiny_tokenizer, tmp_path):
    assert parse_dialogue({"prompt": "p", "response": "r", "system": "s"}) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "p"}, {"role": "model", "content": "r"}]
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                    '{"messages": []}\n[1]\n{"prompt": "p"}\n\n{"messages": [{"role": "robot", "content": "x"}]}\n')
    got = list(read_dialogues(path))
    assert got[0][1][1] == {"role": "model", "content": "b"}
    problems = [p for _, m, p in got if m is None]
    assert len(problems) == 4 and problems[0].startswith(f"{path}, line 2: ") and "line 6" in problems[3]
    only_user = [{"role": "user", "content": "hello"}]
    assert render(tiny_tokenizer, only_user, 100) == "nothing_to_learn"
    assert render(tiny_tokenizer, CHATS[0], 5) == "too_long"
    assert render(tiny_tokenizer, [{"role": "model", "content": "x"}], 100) == "invalid_roles"


def test_packed_dialogues_do_not_see_each_other(tiny_tokenizer):
    """A dialogue's logits in a packed row are those it has alone: document ids and positions restart per dialogue."""
    model = Gemma(get_preset("tiny-gemma3"))  # sliding-window layers too
    model.init_weights(std=0.1, seed=0)
    model.eval()
    examples = [render(tiny_tokenizer, c, 200) for c in CHATS] + [render(tiny_tokenizer, CHATS[0][:2], 200)]
    packed = rows_batch([examples], seq_len=sum(e.length - 1 for e in examples) + 7)  # with padding at the end
    with torch.no_grad():
        together = model(packed.inputs, positions=packed.positions, doc_ids=packed.doc_ids)[0]
        start = 0
        for ex in examples:
            alone = model(torch.tensor([ex.ids[:-1]]))[0]
            torch.testing.assert_close(together[start:start + ex.length - 1], alone, atol=1e-5, rtol=1e-5)
            start += ex.length - 1
    # targets: the next token where the mask says so, IGNORE elsewhere (and on the padding)
    ex = examples[0]
    expected = [t if m else IGNORE for t, m in zip(ex.ids[1:], ex.mask[1:])]
    assert packed.targets[0, :ex.length - 1].tolist() == expected
    assert (packed.targets[0, -7:] == IGNORE).all() and packed.doc_ids[0, -1] == len(examples)


def test_batches_pack_whole_dialogues_and_resume(tiny_tokenizer):
    examples = [Example(list(range(2, 2 + n)), [False] + [True] * (n - 1), f"e{n}") for n in (5, 9, 3, 12, 7, 4, 6)]
    rows = pack_rows(examples, seq_len=12)
    assert [sum(examples[i].length - 1 for i in row) for row in rows] == [12, 2, 11, 9, 5]
    assert [i for row in rows for i in row] == list(range(7))  # in order, whole
    with pytest.raises(GemmalabError, match="do not fit"):
        pack_rows(examples, seq_len=10)
    a = DialogueBatches(examples, batch_size=2, seq_len=12, seed=3)
    first = [next(a) for _ in range(3)]
    b = DialogueBatches(examples, batch_size=2, seq_len=12, seed=3)
    next(b)
    state = b.state_dict()
    c = DialogueBatches(examples, batch_size=2, seq_len=12, seed=3)
    c.load_state_dict(state)
    for want in first[1:]:
        assert torch.equal(next(c).inputs, want.inputs)
    rank1 = DialogueBatches(examples, batch_size=1, seq_len=12, seed=3, rank=1, world_size=2)
    assert torch.equal(next(rank1).inputs[0], first[0].inputs[1])  # ranks share the rows of each global batch
    with pytest.raises(GemmalabError, match="same data"):
        DialogueBatches(examples[:3], batch_size=2, seq_len=12).load_state_dict(state)


# ---- filters ----------------------------------------------------------------------------------------


def _chat(answer: str, prompt: str = "Tell me about yourself.") -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "model", "content": answer}]


def test_self_identification_catches_claims_and_keeps_mentions():
    cfg = IdentityConfig()
    planted = ["I am ChatGPT, a large language model trained by OpenAI.", "I was trained by OpenAI.",
               "As an AI language model developed by OpenAI, I cannot browse.", "I'm an AI assistant called Claude.",
               "My name is Llama.", "I'm an AI assistant from Anthropic.", "I'm built on LLaMA.",
               "Hi! I'm Claude, and I'm happy to help."]
    legit = ["ChatGPT is a chatbot by OpenAI.", "I am Gemma, made by Google.", "I'm not ChatGPT; I'm Gemma.",
             "Claude and ChatGPT are assistants made by Anthropic and OpenAI.", "I am happy to help with Meta's API.",
             "I'm Gemma, trained by Google DeepMind.", "Llamas live in the Andes."]
    assert [t for t in planted if not misidentifies(t, cfg)] == []
    assert [t for t in legit if misidentifies(t, cfg)] == []
    # the identity is configurable: for a model called Claude, claiming Claude is fine and Gemma is not
    other = IdentityConfig(name="Claude", maker="Anthropic", other_names=["Gemma"], other_makers=["Google"])
    assert misidentifies("I'm Claude, made by Anthropic.", other) is None
    assert misidentifies("I am Gemma, trained by Google.", other)


def test_filters_drop_each_kind_once_and_the_counts_reconcile():
    dialogues = [
        ("ok", _chat("I can help with maths and writing.")),
        ("dup", _chat("I can help with maths and writing.")),
        ("near", _chat("I can help with maths, and writing!")),
        ("pii", _chat("Sure, write to jane.doe@example.com or call 212-555-0147.")),
        ("toxic", _chat("You are a fucking idiot.")),
        ("block", _chat("The password is hunter2.")),
        ("who", _chat("I am ChatGPT, made by OpenAI.")),
        ("empty", _chat("   ")),
        ("long", _chat("word " * 3000)),
        ("fine", _chat("Paris is the capital of France.", "What is the capital of France?")),
    ]
    kept, report = filter_dialogues(dialogues, SFTFilterConfig(blocklist=["hunter2"], max_chars=10_000))
    assert [w for w, _ in kept] == ["ok", "fine"]
    assert report.dropped == {"exact_duplicate": 1, "near_duplicate": 1, "personal_data": 1, "toxic_response": 2,
                              "self_identification": 1, "empty_response": 1, "too_long": 1}
    assert report.reconciled and report.dialogues_in == 10 and report.examples["toxic_response"] == ["toxic", "block"]
    off = SFTFilterConfig(pii=False, toxicity=False, identity=None, exact_dedup=False, near_dedup=False)
    assert len(filter_dialogues(dialogues[:7], off)[0]) == 7


def test_builtin_tasks_are_checkable_and_split_without_overlap():
    train, heldout = builtin_dialogues(BuiltinTasks(train=500, heldout=60, seed=1))
    assert len(train) == 500 and len(heldout) == 60
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in heldout}
    assert {e["task"] for e in heldout} == set(TASKS)
    for e in make_examples(50, seed=2):
        assert e["messages"][-1]["content"] == e["answer"] and is_correct(f"  {e['answer']}\n", e["answer"])
    assert builtin_dialogues(BuiltinTasks(train=50, heldout=10, seed=1)) == builtin_dialogues(
        BuiltinTasks(train=50, heldout=10, seed=1))



def test_chatty_demonstrations_change_only_the_training_answers():
    """`chatty`: a seeded share of the training answers wrapped in chatter; prompts, the split, the `answer` field
    and the held-out set are those of the plain tasks."""
    plain = builtin_dialogues(BuiltinTasks(train=2000, heldout=60, seed=1))
    train, heldout = builtin_dialogues(BuiltinTasks(train=2000, heldout=60, seed=1, chatty=0.3, chatter=["Sure! {a}"]))
    assert heldout == plain[1]
    assert [(e["prompt"], e["answer"]) for e in train] == [(e["prompt"], e["answer"]) for e in plain[0]]
    replies = [e["messages"][-1]["content"] for e in train]
    chatty = [r for r, e in zip(replies, train) if r != e["answer"]]
    assert all(r == f"Sure! {e['answer']}" for r, e in zip(replies, train) if r != e["answer"])
    assert 0.27 < len(chatty) / len(train) < 0.33
    for bad, match in [({"chatty": 1.5}, "between 0 and 1"), ({"chatty": 0.1, "chatter": ["Sure!"]}, "hold {a}")]:
        with pytest.raises(GemmalabError, match=match):
            BuiltinTasks(**bad)


# ---- LoRA -------------------------------------------------------------------------------------------


def test_lora_starts_as_the_base_model_and_merges_into_the_same_logits(tmp_path):
    model = Gemma(get_preset("tiny-gemma2"))
    model.init_weights(std=0.1, seed=0)
    tokens = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(tokens)
    cfg = LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=["q", "v", "down"])
    adapted = apply_lora(model, cfg, seed=1)
    assert len(adapted) == 3 * 4 and all(n.endswith((".q", ".v", ".down")) for n in adapted)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), base)  # B = 0: the base model
        for name, p in model.named_parameters():
            if name.endswith(".lora_b"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        tuned = model(tokens)
    assert (tuned - base).abs().max() > 1e-3
    plain = Gemma(get_preset("tiny-gemma2"))
    plain.load_state_dict(merge(model.state_dict(), cfg.scale))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(tokens), tuned, atol=1e-5, rtol=1e-5)
    save_adapter(model, cfg, tmp_path / "adapter", "base-ref")
    fresh = Gemma(get_preset("tiny-gemma2"))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith((".lora_a", ".lora_b"))})
    assert load_adapter(fresh, tmp_path / "adapter") == cfg
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(tokens), tuned)


# ---- the stage ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def start_model(tiny_tokenizer, tmp_path_factory):
    from gemmalab.checkpoint import save_hf

    model = Gemma(get_preset("tiny-gemma"))
    model.init_weights(std=0.02, seed=11)
    return save_hf(model, tmp_path_factory.mktemp("sft_start") / "model", tiny_tokenizer)


def _config(tmp_path: Path, start_model: Path, lora: bool) -> Path:
    path = tmp_path / "sft.toml"
    path.write_text(f"""
[model]
init_from = "{start_model}"

[data]
batch_size = 4
seq_len = 96

[data.builtin]
train = 160
heldout = 12
tasks = ["greater", "count", "add"]

[data.filters]
near_dedup = false

[optim]
lr = 0.003
warmup_steps = 2
{'[lora]' if lora else ''}
{'rank = 4' if lora else ''}
{'dropout = 0.1' if lora else ''}

[train]
steps = 8
log_every = 1
seed = 2

[checkpoint]
every = 3

[heldout]
max_new_tokens = 4
""")
    return path


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lora_sft_reports_heldout_figures_exports_merged_and_resumes_exactly_after_kill(start_model, tmp_path):
    import gemmalab

    config = _config(tmp_path, start_model, lora=True)
    threads = torch.get_num_threads()
    try:  # one thread, as the processes below run: the same kernels, the same bits
        reference = sft(load(SFTConfig, config, ["train.threads=1"]), tmp_path / "ref", progress=False)
    finally:
        torch.set_num_threads(threads)
    for key in ("accuracy_before", "accuracy_after", "heldout_loss_before", "heldout_loss_after"):
        assert reference[key] is not None and reference[key] >= 0
    assert reference["heldout_loss_after"] < reference["heldout_loss_before"]
    assert reference["heldout"] == 12 and reference["filters"]["reconciled"]
    assert reference["dialogues_read"] == reference["filters"]["dialogues_in"] == 160
    assert reference["filters"]["kept"] == reference["dialogues_trained"] + sum(reference["render_dropped"].values())
    assert reference["trainable_params"] < 10_000 < reference["params"]  # adapters only
    saved = json.loads((tmp_path / "ref" / "result.json").read_text())
    assert saved["stage"] == "sft" and saved["accuracy_after"] == reference["accuracy_after"]
    lines = (tmp_path / "ref" / "heldout_after.jsonl").read_text().splitlines()
    assert len(lines) == 13 and json.loads(lines[-1])["accuracy"] == reference["accuracy_after"]
    # the exported model (adapters merged) scores as the adapted model did: the same held-out loss
    merged, tokenizer = gemmalab.load(tmp_path / "ref" / "model")
    assert not any(n.endswith("lora_a") for n, _ in merged.named_parameters())
    assert (tmp_path / "ref" / "adapter" / "adapter.safetensors").is_file()
    from gemmalab.train.sft import _heldout_items, heldout_figures

    cfg = load(SFTConfig, config)
    figures, _ = heldout_figures(merged, tokenizer, _heldout_items(cfg, tokenizer), cfg.heldout, cfg.data)
    assert figures["loss"] == pytest.approx(reference["heldout_loss_after"], rel=1e-5)
    assert figures["accuracy"] == reference["accuracy_after"]

    # killed with SIGKILL after step 5 (checkpoint 3), resumed: the same losses bit for bit (LoRA dropout included)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gemmalab", "sft", "--config", str(config), "--out", str(run), "train.threads=1"]
    proc = subprocess.Popen([*cmd, "debug.hang_at_step=5"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    while not (run / "hang-5").exists():
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run([*cmd, "--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _losses(run) == _losses(tmp_path / "ref")  # 8 steps; dropout masks too (the RNG is part of the state)
    resumed = json.loads((run / "result.json").read_text())
    assert (resumed["accuracy_before"], resumed["heldout_loss_after"]) == (reference["accuracy_before"],
                                                                          reference["heldout_loss_after"])


def test_full_sft_and_config_errors(start_model, tmp_path):
    result = sft(load(SFTConfig, _config(tmp_path, start_model, lora=False), ["train.steps=3"]), tmp_path / "full",
                 progress=False)
    assert result["trainable_params"] == result["params"] and result["lora"] is None
    assert not (tmp_path / "full" / "adapter").exists()
    with pytest.raises(GemmalabError, match=r"no training dialogues"):
        load(SFTConfig, None, ["data.builtin=false"])
    with pytest.raises(GemmalabError, match=r"`lora.targets` must name some of q, k, v"):
        load(SFTConfig, None, ['lora={targets=["qkv"]}'])
    shipped = load(SFTConfig, ROOT / "configs" / "sft" / "tiny.toml", [f'model.init_from="{start_model}"'])
    assert shipped.data.builtin is not None and shipped.lora is None
