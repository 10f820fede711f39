"""MMLU (Hendrycks et al.), 5-shot, exactly as lm-eval's `mmlu` task (`lm_eval/tasks/mmlu/default/`):
the first 5 dev questions of the subject as shots, letters " A".." D" scored by log-likelihood."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gemmalab.errors import GemmalabError
from gemmalab.evaluate.tasks.base import Sample, Task, field_error, find_jsonl, read_csv_rows, read_jsonl

# The 57 subjects and their category: lm-eval's `lm_eval/tasks/mmlu/_generate_configs.py` SUBJECTS, which is
# also what the `tag` of each `mmlu_<subject>.yaml` says. The four categories are lm-eval's groups.
SUBJECTS: dict[str, str] = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}
LETTERS = ("A", "B", "C", "D")
CHOICES = [" A", " B", " C", " D"]  # lm-eval's target_delimiter " " + doc_to_choice


@dataclass
class Question:
    """One MMLU row: question, the four choices, the index of the right one."""

    question: str
    choices: list[str]
    answer: int


def description(subject: str) -> str:
    """lm-eval's per-subject `description`, the prompt's first paragraph."""
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def render_question(q: Question) -> str:
    """lm-eval's `doc_to_text`: the stripped question, lettered choices (not stripped), "Answer:"."""
    lines = [q.question.strip()] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)]
    return "\n".join(lines) + "\nAnswer:"


def render_prompt(subject: str, shots: list[Question], question: Question) -> str:
    """Description, each shot followed by " {letter}" and "\\n\\n", then the question ending in "Answer:"."""
    shot_text = "".join(f"{render_question(s)} {LETTERS[s.answer]}\n\n" for s in shots)
    return description(subject) + shot_text + render_question(question)


def load_mmlu(data_dir: Path, num_fewshot: int = 5) -> Task:
    """MMLU test questions with `num_fewshot` shots: the first dev questions of the same subject, in order.

    Data layouts, tried in this order (the first that is present is used, the others are not read):
    1. Hendrycks' original: `DIR/test/{subject}_test.csv` and `DIR/dev/{subject}_dev.csv`, header-less rows
       question, A, B, C, D, answer letter. Every CSV under `DIR/test/` must be named after a known subject.
    2. HF `cais/mmlu` config "all" exported to JSONL: `DIR/test.jsonl` and `DIR/dev.jsonl` (.gz allowed), rows
       {question, subject, choices [4], answer 0-3}; the subject comes from each row.
    3. HF per-subject configs exported to JSONL: `DIR/{subject}/test.jsonl` and `DIR/{subject}/dev.jsonl`; a
       row's `subject`, where present, must match the folder.
    Any subset of the 57 subjects may be present (`info` says how many). Samples are ordered by subject name,
    then file order; ids are "{subject}/{index in its test split}". `groups` gives [category, subject] for the
    per-category (stem, humanities, social_sciences, other) and per-subject micro-averages.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise GemmalabError(f"MMLU data folder {data_dir} does not exist.")
    if (data_dir / "test").is_dir() and any((data_dir / "test").glob("*.csv")):
        splits, layout = _read_csv_layout(data_dir), "hendrycks-csv"
    elif find_jsonl(data_dir, "test"):
        splits, layout = _read_all_jsonl(data_dir), "hf-jsonl-all"
    elif any(find_jsonl(d, "test") for d in data_dir.iterdir() if d.is_dir()):
        splits, layout = _read_subject_jsonl(data_dir), "hf-jsonl-per-subject"
    else:
        raise GemmalabError(f"No MMLU data in {data_dir}: expected test/{{subject}}_test.csv (with dev/), "
                            "test.jsonl (with dev.jsonl), or {subject}/test.jsonl (with {subject}/dev.jsonl).")

    samples = []
    for subject in sorted(splits):
        dev, test = splits[subject]
        if len(dev) < num_fewshot:
            raise GemmalabError(f"MMLU subject {subject} has {len(dev)} dev questions in {data_dir}; "
                                f"{num_fewshot} shots need {num_fewshot}.")
        shots = dev[:num_fewshot]
        for i, q in enumerate(test):
            samples.append(Sample(id=f"{subject}/{i}", prompt=render_prompt(subject, shots, q), choices=list(CHOICES),
                                  gold=q.answer, data={"subject": subject, "category": SUBJECTS[subject]}))
    return Task(name="mmlu", kind="choice", samples=samples, metric="acc",
                groups=lambda s: [s.data["category"], s.data["subject"]],
                info={"source": str(data_dir), "layout": layout, "num_fewshot": num_fewshot,
                      "fewshot": "first_n of dev, per subject", "split": "test", "subjects": len(splits),
                      "all_subjects": len(splits) == len(SUBJECTS), "protocol": "lm-eval mmlu (default)"})


def _check_subject(subject: str, where: str) -> None:
    if subject not in SUBJECTS:
        raise GemmalabError(f"{where}: unknown MMLU subject {subject!r} (expected one of the 57 subjects, "
                            "e.g. abstract_algebra).")


def _read_csv_layout(data_dir: Path) -> dict[str, tuple[list[Question], list[Question]]]:
    splits = {}
    for test_path in sorted((data_dir / "test").glob("*.csv")):
        if not test_path.name.endswith("_test.csv"):
            raise GemmalabError(f"{test_path}: MMLU test files are named {{subject}}_test.csv.")
        subject = test_path.name[:-len("_test.csv")]
        _check_subject(subject, str(test_path))
        dev_path = data_dir / "dev" / f"{subject}_dev.csv"
        splits[subject] = (_read_csv(dev_path), _read_csv(test_path))
    return splits


def _read_csv(path: Path) -> list[Question]:
    questions = []
    for line, row in read_csv_rows(path, 6):
        letter = row[5].strip()
        if letter not in LETTERS:
            raise field_error(path, line, f"answer must be one of A, B, C, D, got {row[5]!r}.")
        questions.append(Question(row[0], row[1:5], LETTERS.index(letter)))
    return questions


def _read_jsonl_rows(path: Path) -> list[tuple[int, dict, Question]]:
    """(line, raw row, question) for each row of a cais/mmlu JSONL export."""
    out = []
    for line, obj in read_jsonl(path, required=("question", "choices", "answer")):
        choices, answer = obj["choices"], obj["answer"]
        if not isinstance(obj["question"], str):
            raise field_error(path, line, "question must be a string.")
        if not (isinstance(choices, list) and len(choices) == 4 and all(isinstance(c, str) for c in choices)):
            raise field_error(path, line, "choices must be a list of 4 strings.")
        if isinstance(answer, str) and answer in LETTERS:  # tolerate a letter; cais/mmlu stores the index
            answer = LETTERS.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer <= 3:
            raise field_error(path, line, f"answer must be an index 0-3, got {obj['answer']!r}.")
        out.append((line, obj, Question(obj["question"], choices, answer)))
    return out


def _read_all_jsonl(data_dir: Path) -> dict[str, tuple[list[Question], list[Question]]]:
    dev_path, test_path = find_jsonl(data_dir, "dev"), find_jsonl(data_dir, "test")
    if dev_path is None:
        raise GemmalabError(f"MMLU data in {data_dir} has test.jsonl but no dev.jsonl for the shots.")
    by_split = []
    for path in (dev_path, test_path):
        groups: dict[str, list[Question]] = {}
        for line, obj, q in _read_jsonl_rows(path):
            subject = obj.get("subject")
            if not isinstance(subject, str):
                raise field_error(path, line, "missing field subject (a string).")
            _check_subject(subject, f"{path}, line {line}")
            groups.setdefault(subject, []).append(q)
        by_split.append(groups)
    dev, test = by_split
    missing = sorted(set(test) - set(dev))
    if missing:
        raise GemmalabError(f"{dev_path} has no dev questions for subject(s) {', '.join(missing)}.")
    return {s: (dev[s], test[s]) for s in test}


def _read_subject_jsonl(data_dir: Path) -> dict[str, tuple[list[Question], list[Question]]]:
    splits = {}
    for folder in sorted(d for d in data_dir.iterdir() if d.is_dir()):
        test_path = find_jsonl(folder, "test")
        if test_path is None:
            continue
        _check_subject(folder.name, str(folder))
        dev_path = find_jsonl(folder, "dev")
        if dev_path is None:
            raise GemmalabError(f"MMLU data in {folder} has test.jsonl but no dev.jsonl for the shots.")
        pair = []
        for path in (dev_path, test_path):
            rows = _read_jsonl_rows(path)
            for line, obj, _ in rows:
                if obj.get("subject", folder.name) != folder.name:
                    raise field_error(path, line, f"subject {obj['subject']!r} does not match its folder "
                                                  f"{folder.name!r}.")
            pair.append([q for _, _, q in rows])
        splits[folder.name] = (pair[0], pair[1])
    return splits
