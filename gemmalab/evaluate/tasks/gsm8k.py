"""GSM8K (Cobbe et al. 2021), 5-shot, exactly as lm-eval's `gsm8k` task (`lm_eval/tasks/gsm8k/gsm8k.yaml`):
"Question: ...\\nAnswer:" prompts, shots drawn at random from train, exact match of the extracted number."""

from __future__ import annotations

import random
import re
from pathlib import Path

from gemmalab.errors import GemmalabError
from gemmalab.evaluate.tasks.base import Sample, Task, field_error, find_jsonl, read_jsonl

STOP = ("Question:", "</s>", "<|im_end|>")  # gsm8k.yaml `until`
MAX_NEW_TOKENS = 256  # gsm8k.yaml sets no max_gen_toks, so lm-eval's model default (256) applies
FEWSHOT_SEED = 1234  # lm-eval's default --fewshot_random_seed
FALLBACK = "[invalid]"  # lm-eval's RegexFilter fallback when nothing matches

# The two filters of gsm8k.yaml: "strict-match" takes the first "#### N"; "flexible-extract" the last number.
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# exact_match's `regexes_to_ignore`, applied in this order to prediction and reference, then lower-cased.
IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


def extract_strict(text: str) -> str:
    """lm-eval's strict-match: the number after the first "#### ", stripped; "[invalid]" if none."""
    found = STRICT.findall(text)
    return found[0].strip() if found else FALLBACK


def extract_flexible(text: str) -> str:
    """lm-eval's flexible-extract: the last number-like span (group_select -1), stripped; "[invalid]" if none."""
    found = FLEXIBLE.findall(text)
    if not found:
        return FALLBACK
    groups = [g for g in found[-1] if g]
    return groups[0].strip() if groups else FALLBACK


def normalize(text: str) -> str:
    """lm-eval's exact_match normalisation for gsm8k: drop ",", "$", everything up to "#### ", a final ".";
    then lower-case (ignore_case)."""
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def score(sample: Sample, completion: str) -> dict[str, float]:
    """Exact match of the strict and flexible extractions against the reference answer; "maj@1" (the Gemma
    report's name for one greedy sample) is the strict figure."""
    reference = normalize(sample.gold)
    strict = float(normalize(extract_strict(completion)) == reference)
    flexible = float(normalize(extract_flexible(completion)) == reference)
    return {"exact_match_strict": strict, "exact_match_flexible": flexible, "maj@1": strict}


def render_prompt(shots: list[dict], question: str) -> str:
    """Each shot is "Question: {q}\\nAnswer:" + " " (target_delimiter) + its full answer + "\\n\\n"; then the
    question ending in "Answer:"."""
    shot_text = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return shot_text + f"Question: {question}\nAnswer:"


def load_gsm8k(data_dir: Path, num_fewshot: int = 5) -> Task:
    """GSM8K test problems, each with `num_fewshot` train problems as shots, from openai/grade-school-math's
    `DIR/train.jsonl` and `DIR/test.jsonl` (.gz allowed), rows {"question", "answer"} (answer ends
    "#### N").

    The shots are lm-eval's: one `random.Random(1234)`, drawing `rnd.sample(train, num_fewshot)` for each
    test problem in file order (lm-eval's default sampler, seeded by its default fewshot seed, called once per
    document as it builds requests on one rank). The same test document therefore gets the same shots as an
    lm-eval run over the whole split (or a --limit prefix of it). Sample ids are test line indices from 0.
    Headline metric "maj@1" = strict exact match of one greedy sample; the score dict also has
    exact_match_strict and exact_match_flexible.
    """
    data_dir = Path(data_dir)
    train, test = (_read_split(data_dir, name) for name in ("train", "test"))
    if len(train) < num_fewshot:
        raise GemmalabError(f"GSM8K train split in {data_dir} has {len(train)} problems; "
                            f"{num_fewshot} shots need {num_fewshot}.")
    rnd = random.Random(FEWSHOT_SEED)
    samples = []
    for i, row in enumerate(test):
        shots = rnd.sample(train, num_fewshot) if num_fewshot > 0 else []
        samples.append(Sample(id=str(i), prompt=render_prompt(shots, row["question"]), gold=row["answer"]))
    return Task(name="gsm8k", kind="generate", samples=samples, metric="maj@1", stop=STOP,
                max_new_tokens=MAX_NEW_TOKENS, score=score,
                info={"source": str(data_dir), "num_fewshot": num_fewshot, "split": "test",
                      "fewshot": f"random from train, seed {FEWSHOT_SEED}, one draw per test problem in order",
                      "problems": len(samples), "protocol": "lm-eval gsm8k"})


def _read_split(data_dir: Path, name: str) -> list[dict]:
    path = find_jsonl(data_dir, name)
    if path is None:
        raise GemmalabError(f"GSM8K data folder {data_dir} has no {name}.jsonl.")
    rows = []
    for line, obj in read_jsonl(path, required=("question", "answer")):
        if not (isinstance(obj["question"], str) and isinstance(obj["answer"], str)):
            raise field_error(path, line, "question and answer must be strings.")
        if "#### " not in obj["answer"]:
            raise field_error(path, line, 'answer has no final "#### <number>".')
        rows.append({"question": obj["question"], "answer": obj["answer"]})
    return rows
