"""The built-in corpus: English prose, code and math from what every Python installation ships.

Three sources, written as design-contract Documents JSONL (gzip), one file per source:

- ``web``  (prose): the Python language reference topics (``pydoc_data.topics``), one documentation
  page per standard-library module built from its module, class and function docstrings, and the
  Zen of Python.
- ``code``: standard-library ``.py`` files, one document per file, without test suites, generated
  tables (``encodings``, ``_sysconfigdata``) and files over 200 kB.
- ``math``: generated arithmetic and algebra problems with worked step-by-step answers.

Nothing is downloaded; the output is byte-identical for the same Python version, seed and options.
"""

from __future__ import annotations

import ast
import codecs
import gzip
import json
import math
import os
import platform
import random
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from pathlib import Path

from gemmalab.errors import GemmalabError
from gemmalab.files import atomic_open

__all__ = ["SOURCES", "write_builtin_corpus", "stdlib_files", "web_documents", "code_documents",
           "math_documents"]

SOURCES = ("web", "code", "math")

# Directories under the stdlib that hold test suites, bundled wheels or generated data, not prose/code.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings", "pydoc_data",
              "__pycache__", "ensurepip", "turtledemo"}
_SKIP_PREFIXES = ("_sysconfigdata", "test_")
_MAX_CODE_BYTES = 200_000  # larger files are generated tables or would dominate the code source
_MIN_DOC_CHARS = 200  # module pages with less docstring text than this are mostly empty headers


def stdlib_files(max_files: int | None = None) -> list[tuple[str, Path]]:
    """Standard-library source files as (relative posix path, path), sorted by relative path.

    Skips test suites, generated files and ``config-*`` folders; `max_files` keeps the first N
    (for quick runs and tests).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise GemmalabError(f"the Python standard library folder {root} does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune in place so skipped trees (the test suite is a third of the stdlib) are never walked
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        for f in filenames:
            if f.endswith(".py") and not f.startswith(_SKIP_PREFIXES):
                p = Path(dirpath) / f
                out.append((p.relative_to(root).as_posix(), p))
    out.sort()
    return out[:max_files] if max_files is not None else out


def _module_name(rel: str) -> str:
    name = rel[: -len(".py")].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"{node.name}({ast.unparse(node.args)})"
    except Exception:  # unparse of unusual syntax: the name alone is still useful
        return f"{node.name}(...)"


def _module_page(name: str, tree: ast.Module) -> str:
    """A documentation page for one module: module docstring, then classes and functions with theirs."""
    parts = [f"# {name}\n"]
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(doc + "\n")
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            cdoc = ast.get_docstring(node)
            if cdoc:
                parts.append(f"## class {node.name}\n\n{cdoc}\n")
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and not sub.name.startswith("_"):
                    sdoc = ast.get_docstring(sub)
                    if sdoc:
                        parts.append(f"### {node.name}.{_signature(sub)}\n\n{sdoc}\n")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            fdoc = ast.get_docstring(node)
            if fdoc:
                parts.append(f"## {_signature(node)}\n\n{fdoc}\n")
    return "\n".join(parts)


def _doc(id: str, text: str, source: str, **meta) -> dict:
    return {"id": id, "text": text, "metadata": {"source": source, **meta}}


def web_documents(max_files: int | None = None) -> Iterator[dict]:
    """Prose: language-reference topics, one docstring page per stdlib module, and the Zen of Python."""
    from pydoc_data.topics import topics

    py = platform.python_version()
    for name in sorted(topics):
        yield _doc(f"web/pydoc-topic/{name}", topics[name], "web", origin="pydoc_data.topics", python=py)
    for rel, path in stdlib_files(max_files):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):  # a few stdlib files are templates, not Python 3
            continue
        name = _module_name(rel)
        if name == "this":  # the Zen is ROT13-encoded in this.py; decode it instead of importing (it prints)
            for node in tree.body:
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and \
                        isinstance(node.value.value, str) and len(node.value.value) > 100:
                    yield _doc("web/zen-of-python", codecs.decode(node.value.value, "rot13"), "web",
                               origin="this", python=py)
            continue
        page = _module_page(name, tree)
        if len(page) - len(name) >= _MIN_DOC_CHARS:
            yield _doc(f"web/module-doc/{name}", page, "web", origin=rel, python=py)


def code_documents(max_files: int | None = None) -> Iterator[dict]:
    """Code: standard-library source files, one document per file."""
    py = platform.python_version()
    for rel, path in stdlib_files(max_files):
        data = path.read_bytes()
        if len(data) > _MAX_CODE_BYTES or not data.strip():
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # a handful of stdlib files use a legacy coding cookie
            continue
        yield _doc(f"code/{rel}", text, "code", path=rel, python=py)


# ---- math: generated problems with worked answers ------------------------------------------------


def _fmt(x: Fraction | int) -> str:
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _signed(x: int) -> str:
    return f"+ {x}" if x >= 0 else f"- {-x}"


def _money(x: Fraction) -> str:
    return f"${x.numerator}" if x.denominator == 1 else f"${float(x):.2f}"


def _coef(a: int, var: str) -> str:
    """`a` times `var` as written by hand: x, -x, 3x."""
    return var if a == 1 else f"-{var}" if a == -1 else f"{a}{var}"


def _signed_coef(a: int, var: str) -> str:
    return ("+ " if a >= 0 else "- ") + _coef(abs(a), var)


def _p_order_of_operations(r: random.Random) -> tuple[str, str, str, str]:
    a, b, c = r.randint(2, 60), r.randint(2, 30), r.randint(2, 12)
    d = r.randint(2, 9)
    e = d * r.randint(2, 15)
    q = f"Evaluate ({a} + {b}) * {c} - {e} / {d}."
    s = a + b
    steps = [f"First the parentheses: {a} + {b} = {s}.",
             f"Then multiplication and division from left to right: {s} * {c} = {s * c} and {e} / {d} = {e // d}.",
             f"Finally the subtraction: {s * c} - {e // d} = {s * c - e // d}."]
    return "arithmetic", q + "\n", "\n".join(steps), str(s * c - e // d)


def _p_long_multiplication(r: random.Random) -> tuple[str, str, str, str]:
    a, b = r.randint(12, 9999), r.randint(12, 999)
    digits = str(b)[::-1]
    steps, total = [], 0
    for place, dch in enumerate(digits):
        part = a * int(dch) * 10**place
        total += part
        steps.append(f"{a} * {int(dch) * 10**place} = {part}")
    steps.append("Adding the partial products: " + " + ".join(str(a * int(dch) * 10**i) for i, dch in enumerate(digits))
                 + f" = {total}.")
    return "arithmetic", f"What is {a} * {b}?\n", "\n".join(steps), str(total)


def _p_long_addition(r: random.Random) -> tuple[str, str, str, str]:
    nums = [r.randint(100, 99999) for _ in range(r.randint(2, 4))]
    steps, acc = [], nums[0]
    for n in nums[1:]:
        steps.append(f"{acc} + {n} = {acc + n}")
        acc += n
    sub = r.randint(1, acc)
    steps.append(f"{acc} - {sub} = {acc - sub}")
    q = "Compute " + " + ".join(map(str, nums)) + f" - {sub}."
    return "arithmetic", q + "\n", "\n".join(steps), str(acc - sub)


def _p_fractions(r: random.Random) -> tuple[str, str, str, str]:
    a, b, c, d = r.randint(1, 9), r.randint(2, 12), r.randint(1, 9), r.randint(2, 12)
    op = r.choice("+-")
    lcd = math.lcm(b, d)
    na, nc = a * (lcd // b), c * (lcd // d)
    num = na + nc if op == "+" else na - nc
    res = Fraction(num, lcd)
    steps = [f"The least common denominator of {b} and {d} is {lcd}.",
             f"{a}/{b} = {na}/{lcd} and {c}/{d} = {nc}/{lcd}.",
             f"{na}/{lcd} {op} {nc}/{lcd} = {num}/{lcd}."]
    if Fraction(num, lcd).denominator != lcd:
        g = math.gcd(num, lcd)
        steps.append(f"Dividing numerator and denominator by {g} gives {_fmt(res)}.")
    return "arithmetic", f"Simplify {a}/{b} {op} {c}/{d}.\n", "\n".join(steps), _fmt(res)


def _p_percent(r: random.Random) -> tuple[str, str, str, str]:
    price = r.randint(2, 60) * 5
    pct = r.choice([5, 10, 15, 20, 25, 30, 40, 50])
    item = r.choice(["jacket", "book", "lamp", "bicycle", "backpack", "chair", "kettle"])
    off = Fraction(price * pct, 100)
    q = f"A {item} costs ${price}. It is on sale for {pct}% off. What is the sale price?\n"
    steps = [f"The discount is {pct}% of ${price}: {price} * {pct} / 100 = {_money(off)}.",
             f"The sale price is ${price} - {_money(off)} = {_money(price - off)}."]
    return "arithmetic", q, "\n".join(steps), _money(price - off)


def _p_word_problem(r: random.Random) -> tuple[str, str, str, str]:
    name = r.choice(["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo"])
    thing = r.choice(["apples", "stickers", "marbles", "pencils", "cookies", "stamps"])
    have, bags, per, give = r.randint(3, 40), r.randint(2, 9), r.randint(3, 12), r.randint(1, 20)
    total = have + bags * per
    give = min(give, total)
    q = (f"{name} has {have} {thing}. {name} buys {bags} bags with {per} {thing} in each bag, "
         f"then gives away {give}. How many {thing} does {name} have now?\n")
    steps = [f"The bags hold {bags} * {per} = {bags * per} {thing}.",
             f"With the ones already there: {have} + {bags * per} = {total}.",
             f"After giving {give} away: {total} - {give} = {total - give}."]
    return "arithmetic", q, "\n".join(steps), str(total - give)


def _p_gcd(r: random.Random) -> tuple[str, str, str, str]:
    g = r.randint(2, 30)
    a, b = g * r.randint(2, 40), g * r.randint(2, 40)
    x, y = max(a, b), min(a, b)
    steps = []
    while y:
        steps.append(f"{x} = {x // y} * {y} + {x % y}")
        x, y = y, x % y
    steps.append(f"The last nonzero remainder is {x}.")
    return "arithmetic", f"Find the greatest common divisor of {a} and {b} using the Euclidean algorithm.\n", \
        "\n".join(steps), str(x)


def _p_linear(r: random.Random) -> tuple[str, str, str, str]:
    x = r.randint(-20, 20)
    a = r.choice([i for i in range(-9, 10) if i not in (0,)])
    c = r.choice([i for i in range(-9, 10) if i not in (0, a)])
    b = r.randint(-30, 30)
    d = (a - c) * x + b  # so that a x + b = c x + d has the solution x
    q = f"Solve for x: {_coef(a, 'x')} {_signed(b)} = {_coef(c, 'x')} {_signed(d)}.\n"
    steps = [f"Subtract {_coef(c, 'x')} from both sides: {_coef(a - c, 'x')} {_signed(b)} = {d}.",
             f"Subtract {b} from both sides: {_coef(a - c, 'x')} = {d - b}.",
             f"Divide both sides by {a - c}: x = {d - b} / {a - c} = {x}.",
             f"Check: {a} * {x} {_signed(b)} = {a * x + b} and {c} * {x} {_signed(d)} = {c * x + d}."]
    return "algebra", q, "\n".join(steps), f"x = {x}"


def _p_system(r: random.Random) -> tuple[str, str, str, str]:
    x, y = r.randint(-10, 10), r.randint(-10, 10)
    while True:
        a, b, c, d = (r.choice([i for i in range(-6, 7) if i]) for _ in range(4))
        if a * d - b * c != 0:
            break
    e, f = a * x + b * y, c * x + d * y
    q = (f"Solve the system: {_coef(a, 'x')} {_signed_coef(b, 'y')} = {e} and "
         f"{_coef(c, 'x')} {_signed_coef(d, 'y')} = {f}.\n")
    steps = [f"Multiply the first equation by {c} and the second by {a}: "
             f"{_coef(a * c, 'x')} {_signed_coef(b * c, 'y')} = {e * c} and "
             f"{_coef(a * c, 'x')} {_signed_coef(a * d, 'y')} = {f * a}.",
             f"Subtract the first from the second: {_coef(a * d - b * c, 'y')} = {f * a - e * c}, so y = {y}.",
             f"Substitute into the first equation: {_coef(a, 'x')} {_signed(b * y)} = {e}, "
             f"so {_coef(a, 'x')} = {e - b * y} and x = {x}."]
    return "algebra", q, "\n".join(steps), f"x = {x}, y = {y}"


def _p_quadratic(r: random.Random) -> tuple[str, str, str, str]:
    r1, r2 = r.randint(-12, 12), r.randint(-12, 12)
    b, c = -(r1 + r2), r1 * r2
    poly = f"x^2 {_signed_coef(b, 'x')} {_signed(c)}" if b else f"x^2 {_signed(c)}"
    q = f"Solve {poly} = 0 by factoring.\n"
    roots = sorted({r1, r2})
    steps = [f"We need two numbers whose product is {c} and whose sum is {b}: {-r1} and {-r2}.",
             f"So {poly} = (x {_signed(-r1)})(x {_signed(-r2)}).",
             "A product is zero when a factor is zero, so x = " + " or x = ".join(map(str, roots)) + "."]
    return "algebra", q, "\n".join(steps), ", ".join(f"x = {v}" for v in roots)


def _p_expand(r: random.Random) -> tuple[str, str, str, str]:
    a, b, c, d = (r.choice([i for i in range(-9, 10) if i]) for _ in range(4))
    q = f"Expand ({_coef(a, 'x')} {_signed(b)})({_coef(c, 'x')} {_signed(d)}).\n"
    mid = a * d + b * c
    steps = [f"First terms: {_coef(a, 'x')} * {_coef(c, 'x')} = {_coef(a * c, 'x^2')}.",
             f"Outer and inner terms: {_coef(a * d, 'x')} {_signed_coef(b * c, 'x')} = {mid}x.",
             f"Last terms: {b} * {d} = {b * d}."]
    ans = f"{_coef(a * c, 'x^2')} {_signed_coef(mid, 'x')} {_signed(b * d)}" if mid else \
        f"{_coef(a * c, 'x^2')} {_signed(b * d)}"
    return "algebra", q, "\n".join(steps), ans


_MATH_KINDS: tuple[Callable[[random.Random], tuple[str, str, str, str]], ...] = (
    _p_order_of_operations, _p_long_multiplication, _p_long_addition, _p_fractions, _p_percent,
    _p_word_problem, _p_gcd, _p_linear, _p_system, _p_quadratic, _p_expand,
)


def math_documents(n: int, seed: int = 0) -> Iterator[dict]:
    """`n` generated arithmetic and algebra problems with worked answers, deterministic by `seed`."""
    r = random.Random(seed)
    for i in range(n):
        gen = _MATH_KINDS[r.randrange(len(_MATH_KINDS))]
        topic, question, solution, answer = gen(r)
        text = f"Problem: {question}\nSolution:\n{solution}\n\nAnswer: {answer}\n"
        yield _doc(f"math/{seed}/{i:07d}", text, "math", topic=topic, generator=gen.__name__[3:])


# ---- writing ---------------------------------------------------------------------------------


def _write_jsonl_gz(path: Path, docs: Iterable[dict]) -> int:
    """Write docs as gzip JSONL with a fixed header (mtime 0, no name) so the bytes are reproducible."""
    n = 0
    with atomic_open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        for d in docs:
            gz.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
            n += 1
    return n


def write_builtin_corpus(out_dir: str | Path, *, seed: int = 0, math_problems: int = 20000,
                         max_files: int | None = None, sources: Iterable[str] = SOURCES) -> list[Path]:
    """Write the built-in corpus to `out_dir` as ``{source}.jsonl.gz``, one file per source.

    `seed` and `math_problems` set the generated math; `max_files` caps the stdlib files read for
    web and code (None: all). Returns the written paths in `sources` order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = list(sources)
    for s in sources:
        if s not in SOURCES:
            raise GemmalabError(f"unknown built-in corpus source {s!r}; choose from {', '.join(SOURCES)}")
    if math_problems < 0:
        raise GemmalabError(f"math_problems must be >= 0, got {math_problems}")
    makers = {"web": lambda: web_documents(max_files), "code": lambda: code_documents(max_files),
              "math": lambda: math_documents(math_problems, seed)}
    paths = []
    for s in sources:
        path = out / f"{s}.jsonl.gz"
        _write_jsonl_gz(path, makers[s]())
        paths.append(path)
    return paths
