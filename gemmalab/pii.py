"""One PII detector for the whole recipe: data filters, SFT filters and the memorization audit.

`find_pii(text)` returns validated matches; `redact(text)` replaces them with typed placeholders
(`<EMAIL>`, `<PHONE>`, `<CARD>`, `<SSN>`, `<IP>`, `<IBAN>`, `<SECRET>`).

Every numeric kind is validated, not just pattern-matched, so that ISBNs, version numbers, dates
and plain numbers are left alone: cards need a Luhn checksum and a card-network prefix, IBANs the
ISO 13616 mod-97 check and the country's length, phone numbers libphonenumber's `is_valid_number`,
SSNs the SSA area/group/serial rules, IP addresses must parse with `ipaddress` and not follow a
word such as "version".
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass

import phonenumbers

__all__ = ["KINDS", "PiiMatch", "find_pii", "redact", "placeholder"]

# Order = priority when two matches overlap (a card number is not also reported as a phone number).
KINDS = ("SECRET", "CARD", "IBAN", "SSN", "EMAIL", "IP", "PHONE")
_PRIORITY = {k: i for i, k in enumerate(KINDS)}


@dataclass(frozen=True)
class PiiMatch:
    """One detected span: `text[start:end] == self.text`, `kind` one of `KINDS`."""

    kind: str
    start: int
    end: int
    text: str


def placeholder(kind: str) -> str:
    """The typed placeholder that replaces a match of `kind`, e.g. `<EMAIL>`."""
    return f"<{kind}>"


# --- patterns -------------------------------------------------------------------------------

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b")
_CARD = re.compile(r"\d(?:[ -]?\d){12,18}(?![\d-])")
_SSN = re.compile(r"(\d{3})-(\d{2})-(\d{4})(?![\d-])")
_IPV4 = re.compile(r"(?:\d{1,3}\.){3}\d{1,3}(?![\w.]|\.\d)")
_IPV6 = re.compile(r"(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_PHONE_HINT = re.compile(r"\d[\d \t().\-/]{5,}\d")
# Patterns start with a character class, not a lookbehind, so the regex engine can skip ahead fast;
# what a lookbehind would check is done by `_clear_before` on each candidate.
# The word right before an IPv4-looking token: version strings are not addresses.
_VERSION_CONTEXT = re.compile(r"(?i)(?:\bversions?|\bver|\brelease|\bv|\bbuild|\bpython|\bpackage)[\s:=]*$")

_SECRET_PATTERNS = [
    re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b"),  # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),  # Slack tokens
    re.compile(r"https://hooks\.slack\.com/services/T[A-Za-z0-9]+/B[A-Za-z0-9]+/[A-Za-z0-9]+"),
    re.compile(r"(?<![\w-])sk-(?:proj-|svcacct-|admin-|ant-[a-z0-9]+-)?[A-Za-z0-9_-]{20,}"),  # OpenAI-style
    re.compile(r"\b(?:sk|rk)_live_[0-9A-Za-z]{24,}\b"),  # Stripe
    re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),  # Google API key
    re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{10,}"),  # JWT
]
# Each secret pattern needs one of these literals: a C-speed `in` test skips the regex on most texts.
_SECRET_ANCHORS = [
    ("PRIVATE KEY",), ("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA", "ANVA", "AIPA"),
    ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), ("github_pat_",), ("xox",), ("hooks.slack.com",), ("sk-",),
    ("_live_",), ("AIza",), ("eyJ",),
]
# `api_key = "..."`-style assignments; only the quoted value is the secret. We scan for the cheap
# part (an operator and a quoted value) and then look for the keyword just before it.
_QUOTED_VALUE = re.compile(r"""[:=>][ \t]*["']([^"'\s]{12,200})["']""")
_SECRET_KEY_BEFORE = re.compile(
    r"(?i)(?:api[_-]?key|secret|access[_-]?key|access[_-]?token|auth[_-]?token|token|password|passwd|"
    r"private[_-]?key)[a-z0-9_]*[\"']?[ \t]*[:=]?$"
)

# Unquoted assignments in shell, .env and config syntax: `export AWS_SECRET_ACCESS_KEY=...`, `DB_PASSWORD: ...`; the
# value is token-like (no brackets, quotes or `$`: code such as os.environ[...] is not a secret).
_UNQUOTED_ASSIGNMENT = re.compile(
    r"(?im)(?:^|[\s;])(?:export[ \t]+)?[a-z0-9_.-]*(?:api[_-]?key|secret|access[_-]?key|token|password|passwd|"
    r"private[_-]?key)[a-z0-9_.-]*[ \t]*[:=][ \t]*([A-Za-z0-9+/=_.~-]{12,200})(?=$|[\s;,])"
)

# IBAN lengths by country (ISO 13616 registry, the common ones).
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24,
    "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21,
    "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31,
    "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "SA": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TN": 24, "TR": 26, "UA": 29, "VG": 24, "XK": 20,
}


def _clear_before(text: str, start: int, extra: str) -> bool:
    """True when the character before `start` is not a word character nor one of `extra`."""
    if start == 0:
        return True
    c = text[start - 1]
    return not (c.isalnum() or c == "_" or c in extra)


# --- validators -----------------------------------------------------------------------------


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_network_ok(digits: str) -> bool:
    """A known issuer prefix and length: keeps ISBN-13 (978/979) and other Luhn-valid numbers out."""
    n = len(digits)
    p2, p4, p6 = int(digits[:2]), int(digits[:4]), int(digits[:6])
    if digits[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= p2 <= 55 or 222100 <= p6 <= 272099:
        return n == 16  # Mastercard
    if p2 in (34, 37):
        return n == 15  # Amex
    if p4 == 6011 or p2 == 65 or 644 <= int(digits[:3]) <= 649 or 622126 <= p6 <= 622925:
        return 16 <= n <= 19  # Discover
    if 3528 <= p4 <= 3589:
        return 16 <= n <= 19  # JCB
    if p2 in (36, 38, 39) or 300 <= int(digits[:3]) <= 305:
        return 14 <= n <= 19  # Diners
    if p2 == 62:
        return 16 <= n <= 19  # UnionPay
    return False


def _ssn_ok(area: str, group: str, serial: str) -> bool:
    a = int(area)
    return a != 0 and a != 666 and a < 900 and group != "00" and serial != "0000"


def _iban_ok(candidate: str) -> bool:
    iban = candidate.replace(" ", "")
    if _IBAN_LENGTHS.get(iban[:2]) != len(iban):
        return False
    moved = iban[4:] + iban[:4]
    number = "".join(str(int(ch, 36)) for ch in moved)
    return int(number) % 97 == 1


def _entropy(s: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(s)
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _looks_random(value: str) -> bool:
    """High-entropy and mixed: keeps `password = "correcthorsebattery"`-like prose and placeholders out."""
    if _entropy(value) < 3.0:
        return False
    classes = sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"\d"))
    return classes >= 2 and not re.fullmatch(r"(?i)[x*.<>{}$-]+|your[_-].*|<.*>|\$\{.*\}", value)


# --- detectors ------------------------------------------------------------------------------


def _find_secrets(text: str, unquoted: bool = False) -> list[PiiMatch]:
    out = []
    for pat, anchors in zip(_SECRET_PATTERNS, _SECRET_ANCHORS):
        if any(a in text for a in anchors):
            out += [PiiMatch("SECRET", m.start(), m.end(), m.group()) for m in pat.finditer(text)]
    for m in _QUOTED_VALUE.finditer(text):
        value = m.group(1)
        if _SECRET_KEY_BEFORE.search(text, max(0, m.start() - 64), m.start()) and _looks_random(value):
            out.append(PiiMatch("SECRET", m.start(1), m.end(1), value))
    if unquoted and ("=" in text or ":" in text):
        for m in _UNQUOTED_ASSIGNMENT.finditer(text):
            if _looks_random(m.group(1)):
                out.append(PiiMatch("SECRET", m.start(1), m.end(1), m.group(1)))
    return out


def _find_cards(text: str) -> list[PiiMatch]:
    out = []
    for m in _CARD.finditer(text):
        if not _clear_before(text, m.start(), "-"):
            continue
        # A run may join a card to a neighbouring number: try runs of whole digit groups, longest first.
        groups = [(g.start(), g.end()) for g in re.finditer(r"\d+", m.group())]
        spans = sorted(
            ((i, j) for i in range(len(groups)) for j in range(i, len(groups))),
            key=lambda ij: groups[ij[0]][0] - groups[ij[1]][1],
        )
        for i, j in spans:
            s, e = m.start() + groups[i][0], m.start() + groups[j][1]
            digits = re.sub(r"[ -]", "", text[s:e])
            if 13 <= len(digits) <= 19 and _card_network_ok(digits) and _luhn_ok(digits):
                out.append(PiiMatch("CARD", s, e, text[s:e]))
                break
    return out


def _find_ibans(text: str) -> list[PiiMatch]:
    out = []
    for m in _IBAN.finditer(text):
        cand = m.group().rstrip()
        # The pattern may run into a following word; shrink until a valid IBAN or too short.
        while len(cand.replace(" ", "")) >= 15:
            if _iban_ok(cand):
                out.append(PiiMatch("IBAN", m.start(), m.start() + len(cand), cand))
                break
            cand = cand[:-1].rstrip()
    return out


def _find_ssns(text: str) -> list[PiiMatch]:
    return [PiiMatch("SSN", m.start(), m.end(), m.group()) for m in _SSN.finditer(text)
            if _clear_before(text, m.start(), "-") and _ssn_ok(*m.groups())]


def _find_emails(text: str) -> list[PiiMatch]:
    if "@" not in text:
        return []
    return [PiiMatch("EMAIL", m.start(), m.end(), m.group()) for m in _EMAIL.finditer(text)]


def _find_ips(text: str) -> list[PiiMatch]:
    out = []
    if "." in text:
        for m in _IPV4.finditer(text):
            if not _clear_before(text, m.start(), "."):
                continue
            if _VERSION_CONTEXT.search(text[max(0, m.start() - 24) : m.start()]):
                continue
            try:
                ipaddress.IPv4Address(m.group())
            except ValueError:
                continue
            out.append(PiiMatch("IP", m.start(), m.end(), m.group()))
    if "::" in text or text.count(":") >= 7:
        for m in _IPV6.finditer(text):
            if not _clear_before(text, m.start(), ":."):
                continue
            s = m.group()
            groups = [g for g in s.split(":") if g]
            # "a::b" in code or "10:30:00" times are not addresses: need a full 4-digit group or 3+ groups.
            if not (any(len(g) == 4 for g in groups) or len(groups) >= 3):
                continue
            try:
                ipaddress.IPv6Address(s)
            except ValueError:
                continue
            out.append(PiiMatch("IP", m.start(), m.end(), s))
    return out


_SPACED_OPERATOR = re.compile(r"\d\s+[-/]\s+\d")


def _formatted_phone(text: str, start: int, end: int) -> bool:
    """Written like a phone number: a bare digit run ("2147483647") or a decimal is a plain number."""
    m = text[start:end]
    if re.fullmatch(r"\+?\d+[.,]\d+", m):  # a decimal number
        return False
    if re.match(r"[.,]\d", text[end : end + 2]) or m.isdigit() and not text[max(0, start - 1) : start] == "+":
        return False
    return True


def _arithmetic(text: str, start: int, end: int) -> bool:
    """Digits in a sum, not a phone number: "126382 - 38147 = 88235", "= 4155552671 + 3"."""
    if _SPACED_OPERATOR.search(text, start, end):
        return True
    before, after = text[max(0, start - 3) : start].rstrip(), text[end : end + 3].lstrip()
    return before.endswith(("=", "+", "-", "*", "×", "÷", "/")) or after.startswith(("=", "+", "-", "*", "×", "÷", "/"))


def _find_phones(text: str, region: str) -> list[PiiMatch]:
    out = []
    # libphonenumber is slow on long texts: only run it around digit runs that could be numbers.
    for hint in _PHONE_HINT.finditer(text):
        n_digits = sum(c.isdigit() for c in hint.group())
        if n_digits < 7:  # no valid number is shorter (arithmetic like "(12 - 5) / 7" lands here)
            continue
        lo, hi = max(0, hint.start() - 4), min(len(text), hint.end() + 1)
        chunk = text[lo:hi]
        for pm in phonenumbers.PhoneNumberMatcher(chunk, region, leniency=phonenumbers.Leniency.VALID):
            if phonenumbers.is_valid_number(pm.number):
                s, e = lo + pm.start, lo + pm.end
                if _formatted_phone(text, s, e) and not _arithmetic(text, s, e):
                    out.append(PiiMatch("PHONE", s, e, text[s:e]))
    return out


def find_pii(text: str, kinds: tuple[str, ...] | None = None, region: str = "US",
             unquoted_secrets: bool = False) -> list[PiiMatch]:
    """Every validated PII span in `text`, sorted by start, overlaps resolved by kind priority.

    `kinds` limits detection to a subset of `KINDS`; `region` is the default phone region for
    numbers written without a country code. `unquoted_secrets` also reports token-like values assigned to
    credential-named variables without quotes (`export AWS_SECRET_ACCESS_KEY=...`, `DB_PASSWORD: ...`): the
    memorization audit does; the data filters do not (the built-in shards, recorded byte for byte, predate it).
    """
    wanted = set(KINDS if kinds is None else kinds)
    unknown = wanted - set(KINDS)
    if unknown:
        raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {list(KINDS)}")
    finders = {"SECRET": lambda t: _find_secrets(t, unquoted_secrets), "CARD": _find_cards, "IBAN": _find_ibans, "SSN": _find_ssns,
               "EMAIL": _find_emails, "IP": _find_ips, "PHONE": lambda t: _find_phones(t, region)}
    found: list[PiiMatch] = [m for kind, find in finders.items() if kind in wanted for m in find(text)]
    # Higher priority first, then longer spans; drop anything overlapping an accepted span.
    found.sort(key=lambda m: (_PRIORITY[m.kind], m.start - m.end, m.start))
    accepted: list[PiiMatch] = []
    for m in found:
        if all(m.end <= a.start or m.start >= a.end for a in accepted):
            accepted.append(m)
    return sorted(accepted, key=lambda m: m.start)


def redact(text: str, kinds: tuple[str, ...] | None = None, region: str = "US") -> tuple[str, dict[str, int]]:
    """Replace every PII span with its typed placeholder; returns (new text, counts by kind)."""
    matches = find_pii(text, kinds, region)
    if not matches:
        return text, {}
    parts, pos = [], 0
    for m in matches:
        parts += [text[pos : m.start], placeholder(m.kind)]
        pos = m.end
    parts.append(text[pos:])
    return "".join(parts), dict(Counter(m.kind for m in matches))
