"""The real Gemma 3 270M against transformers loading the same GGUF file in fp32."""

import json

import pytest
import torch

from gemmalab import generate

pytestmark = pytest.mark.real_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "Die Hauptstadt von Deutschland ist",
    "1, 2, 3, 5, 8, 13,",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
]


def test_logits_match_transformers(real_model, hf_gguf_model, hf_gguf_tokenizer):
    model, tokenizer = real_model
    worst = 0.0
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        assert ids == hf_gguf_tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            ours = model(torch.tensor([ids]))
            theirs = hf_gguf_model(torch.tensor([ids])).logits
        worst = max(worst, (ours - theirs).abs().max().item())
    assert worst <= 1e-3, f"max |logit difference| {worst:.2e}"


def test_batched_logits_with_padding_match_transformers(real_model, hf_gguf_model, hf_gguf_tokenizer):
    model, tokenizer = real_model
    batch = hf_gguf_tokenizer(PROMPTS[:3], padding=True, padding_side="right", return_tensors="pt")
    with torch.no_grad():
        ours = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        theirs = hf_gguf_model(**batch).logits
    keep = batch["attention_mask"].bool()
    assert (ours[keep] - theirs[keep]).abs().max().item() <= 1e-3


def test_greedy_continuations_match_transformers(real_model, hf_gguf_model):
    model, tokenizer = real_model
    outs = generate(model, tokenizer, PROMPTS[:5], max_new_tokens=32, stop_ids=())
    for prompt, out in zip(PROMPTS[:5], outs):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            theirs = hf_gguf_model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        assert out.ids == theirs[0, ids.shape[1]:].tolist(), prompt
    assert outs[0].text.startswith(" the capital of the country of France")


def test_cli_generate_json(gguf_path, capsys):
    from gemmalab.cli import main  # in this process (test_chat runs the entry point in a process of its own)

    assert main(["generate", "--model", str(gguf_path), "--prompt", "The capital of France is", "--max-new-tokens",
                 "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_ids"] == [2, 818, 5279, 529, 7001, 563]
    assert len(out["ids"]) == 8 and out["text"].startswith(" the capital")


def test_cli_tokenize_jsonl(tmp_path, gguf_path, capsys):
    from gemmalab.cli import main

    (tmp_path / "in.jsonl").write_text('{"text": "Hello"}\n{"text": "<start_of_turn>user"}\n')
    assert main(["tokenize", "--model", str(gguf_path), "--input", str(tmp_path / "in.jsonl"), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and lines[1]["ids"][:2] == [2, 105]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    assert main(["tokenize", "--model", str(gguf_path), "--input", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl, line 2" in capsys.readouterr().err


def test_converted_model_directory_loads_in_transformers(real_model, gguf_path, tmp_path):
    import transformers

    from gemmalab.cli import main

    assert main(["convert", str(gguf_path), str(tmp_path / "hf")]) == 0
    model, tokenizer = real_model
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = "Paris is the capital of"
    ids = tokenizer.encode(prompt)
    assert hf_tok(prompt)["input_ids"] == ids
    with torch.no_grad():
        diff = (model(torch.tensor([ids])) - hf(torch.tensor([ids])).logits).abs().max().item()
    assert diff <= 1e-4


def test_cli_generate_quantized(gguf_path, capsys):
    from gemmalab.cli import main

    assert main(["generate", "--model", str(gguf_path), "--prompt", "The capital of France is", "--max-new-tokens",
                 "6", "--quantize", "int8", "--dtype", "bfloat16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"].startswith(" the capital of the country")
