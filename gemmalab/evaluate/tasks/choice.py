"""Declarative multiple-choice tasks: lm-evaluation-harness's Jinja fields (doc_to_text, doc_to_choice,
doc_to_target) over local JSONL rows. The built-in ones (ARC, PIQA, BoolQ, SIQA, OpenBookQA, HellaSwag,
WinoGrande, CommonsenseQA) are in choice_tasks.toml; a user's own is a TOML file with the same fields."""

from __future__ import annotations

import ast
import math
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gemmalab.config import read_toml
from gemmalab.errors import GemmalabError
from gemmalab.evaluate.tasks.base import Sample, Task, read_jsonl

BUILTIN_FILE = Path(__file__).with_name("choice_tasks.toml")


@dataclass
class ChoiceSpec:
    """One multiple-choice task (see choice_tasks.toml for the meaning of each field)."""

    name: str
    data: str
    doc_to_text: str
    doc_to_choice: str
    doc_to_target: str
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    num_fewshot: int = 0
    fewshot_data: str = ""
    preprocess: str = ""
    partial: bool = False


def _hellaswag(doc: dict) -> dict:
    """lm-eval's hellaswag process_docs: WikiHow bracket artifacts removed, the context joined."""
    def clean(text: str) -> str:
        text = text.strip().replace(" [title]", ". ")
        return re.sub("\\[.*?\\]", "", text).replace("  ", " ")

    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {**doc, "query": clean(doc["activity_label"] + ": " + ctx), "choices": [clean(e) for e in doc["endings"]],
            "gold": int(doc["label"])}


PREPROCESS = {"hellaswag": _hellaswag}
_MAX_REPEAT = 10**6  # the most items (characters, list entries) `*` may make; the most digits `**` may


class _TaskTemplates(ImmutableSandboxedEnvironment):
    """Task files come from anywhere: their templates run sandboxed (no walking from a value to Python's internals,
    `''.__class__.__mro__`, no changing the row), and the two operators that can allocate without bound
    (`'a' * 10**10`, `9 ** 10**9`) are refused past a million items or digits."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_REPEAT:
                raise SecurityError(f"`*` would make {len(seq) * n:,} items (at most {_MAX_REPEAT:,})")
        elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                right * math.log10(abs(left)) > _MAX_REPEAT:
            raise SecurityError(f"`**` would make a number of more than {_MAX_REPEAT:,} digits")
        return super().call_binop(context, operator, left, right)


_ENV = _TaskTemplates(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_ENV.filters["regex_replace"] = lambda s, pattern, repl: re.sub(pattern, repl, s)


def builtin_specs() -> dict[str, ChoiceSpec]:
    """The shipped multiple-choice tasks by name."""
    table = tomllib.loads(BUILTIN_FILE.read_text())
    return {name: _spec(name, body, BUILTIN_FILE) for name, body in table.items()}


def read_spec(path: str | Path) -> ChoiceSpec:
    """A user's task TOML (the fields of ChoiceSpec; `name` defaults to the file name)."""
    path = Path(path)
    body = read_toml(path, "task file")
    return _spec(body.pop("name", path.stem), body, path)


def _spec(name: str, body: dict, source: Path) -> ChoiceSpec:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or ".." in name:
        # the name becomes file names under --out: no separators, no "..", nothing that escapes the folder
        raise GemmalabError(f"{source}: task name {name!r} must be letters, digits, '_', '-' or '.' (no '..'), "
                            f"starting with a letter or digit.")
    known = {f.name for f in fields(ChoiceSpec)} - {"name"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise GemmalabError(f"{source}, task {name}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
    missing = [k for k in ("data", "doc_to_text", "doc_to_choice", "doc_to_target") if k not in body]
    if missing:
        raise GemmalabError(f"{source}, task {name}: missing field(s) {', '.join(missing)}.")
    for f in fields(ChoiceSpec):  # the annotations are the names "str", "int", "bool"
        if f.name == "name":
            continue  # checked above
        kind, value = {"str": str, "int": int, "bool": bool}[f.type], body.get(f.name, f.default)
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 0)):
            raise GemmalabError(f"{source}, task {name}: field {f.name} must be "
                                f"{'a whole number >= 0' if kind is int else kind.__name__}, got {value!r:.80}.")
    if body.get("preprocess", "") not in ("", *PREPROCESS):
        raise GemmalabError(f"{source}, task {name}: unknown preprocess {body['preprocess']!r}; known: {', '.join(PREPROCESS)}.")
    return ChoiceSpec(name=name, **body)


def _render(template: str, doc: dict):
    """lm-eval's rule: a bare field name is that field's value; anything else is a Jinja template."""
    if template in doc:
        return doc[template]
    return _ENV.from_string(template).render(**doc)


def _document(spec: ChoiceSpec, doc: dict, where: str) -> tuple[str, list[str], int]:
    """(text, choices, gold index) of one row, with lm-eval's conversions of rendered strings."""
    try:
        doc = PREPROCESS[spec.preprocess](doc) if spec.preprocess else doc
        text = _render(spec.doc_to_text, doc)
        choices = _render(spec.doc_to_choice, doc)
        if isinstance(choices, str):
            choices = ast.literal_eval(choices)
        target = _render(spec.doc_to_target, doc)
    except (jinja2.TemplateError, KeyError, ValueError, SyntaxError, TypeError, IndexError, AttributeError,
            ArithmeticError, RecursionError) as e:  # SecurityError is a TemplateError: the sandbox refused it
        raise GemmalabError(f"{where}: task {spec.name} cannot render this row: {type(e).__name__}: {e}.") from None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise GemmalabError(f"{where}: task {spec.name}: doc_to_choice must give a non-empty list of strings, got {choices!r}.")
    if isinstance(target, str):
        target = int(target) if target.strip().lstrip("-").isdigit() else (choices.index(target) if target in choices else None)
    if not isinstance(target, int) or not 0 <= target < len(choices):
        raise GemmalabError(f"{where}: task {spec.name}: doc_to_target gives {target!r}, not one of the "
                            f"{len(choices)} choices.")
    return str(text), choices, target


def load_choice_task(spec: ChoiceSpec, data_dir: Path | None) -> Task:
    """Read the spec's rows into a Task of kind "choice". Few-shot examples are the first `num_fewshot` rows of
    `fewshot_data` in file order (lm-eval's first_n sampler)."""
    def rows(name: str) -> list[tuple[str, str, list[str], int]]:
        path = Path(name) if Path(name).is_absolute() or data_dir is None else data_dir / name
        if not path.is_file():
            raise GemmalabError(f"Task {spec.name}: data file {path} does not exist (pass --data-dir with the "
                                f"task's rows as JSONL; see docs/evaluate.md).")
        return [(f"{path.name}:{n}", *_document(spec, doc, f"{path}, line {n}")) for n, doc in read_jsonl(path)]

    shots = ""
    if spec.num_fewshot:
        if not spec.fewshot_data:
            raise GemmalabError(f"Task {spec.name}: num_fewshot = {spec.num_fewshot} needs fewshot_data.")
        examples = rows(spec.fewshot_data)[:spec.num_fewshot]
        if spec.partial:
            raise GemmalabError(f"Task {spec.name}: few-shot examples are not supported with partial scoring.")
        shots = "".join(text + spec.target_delimiter + choices[gold] + spec.fewshot_delimiter
                        for _, text, choices, gold in examples)
    samples = []
    for sample_id, text, choices, gold in rows(spec.data):
        if spec.partial:  # the choices are contexts; the text is the continuation scored after each
            samples.append(Sample(sample_id, "", [text], contexts=[spec.description + c for c in choices], gold=gold))
        else:
            samples.append(Sample(sample_id, spec.description + shots + text, choices, gold=gold))
    if not samples:
        raise GemmalabError(f"Task {spec.name}: {spec.data} holds no rows.")
    return Task(spec.name, "choice", samples, metric="acc", target_delimiter=spec.target_delimiter,
                info={"data": spec.data, "num_fewshot": spec.num_fewshot, "partial": spec.partial})
