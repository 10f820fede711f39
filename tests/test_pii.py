"""PII detection: every kind found and redacted, and no false positives on look-alikes."""

import pytest

from gemmalab.pii import KINDS, find_pii, placeholder, redact

# One planted example per kind (all fake but valid under the validators).
PLANTED = {
    "EMAIL": "jane.doe+news@example-mail.co.uk",
    "PHONE": "(415) 555-2671",
    "CARD": "4111 1111 1111 1111",
    "SSN": "123-45-6789",
    "IP": "192.168.10.42",
    "IBAN": "GB82 WEST 1234 5698 7654 32",
}
SECRETS = [
    "AKIAIOSFODNN7EXAMPLE",  # AWS access key id
    "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",  # GitHub token
    "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",  # Slack bot token
    "sk-proj-" + "Ab3dEf6hIj9lMn2pQr5tUv8xYz1bCd4fGh7",  # OpenAI-style key
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",  # JWT
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7bq9\n-----END RSA PRIVATE KEY-----",
]


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_each_kind_found_and_redacted(kind):
    value = PLANTED[kind]
    text = f"Contact record: {value} was stored in the log."
    matches = find_pii(text)
    assert [(m.kind, m.text) for m in matches] == [(kind, value)]
    redacted, counts = redact(text)
    assert redacted == f"Contact record: {placeholder(kind)} was stored in the log."
    assert counts == {kind: 1}


def test_ipv6_found():
    text = "server at 2001:db8:85a3::8a2e:370:7334 answered"
    assert [(m.kind, m.text) for m in find_pii(text)] == [("IP", "2001:db8:85a3::8a2e:370:7334")]


@pytest.mark.parametrize("secret", SECRETS)
def test_secrets_found(secret):
    text = f"config:\n{secret}\nend"
    redacted, counts = redact(text)
    assert counts == {"SECRET": 1}
    assert redacted == "config:\n<SECRET>\nend"


def test_assigned_high_entropy_secret_only_value_redacted():
    text = 'api_key = "Zq8vR2mX9pL4tW7yB1nK6cJ3"\npassword = "changeme_changeme"'
    redacted, counts = redact(text)
    assert redacted == 'api_key = "<SECRET>"\npassword = "changeme_changeme"'
    assert counts == {"SECRET": 1}


@pytest.mark.parametrize("line", ["export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                                  "DB_PASSWORD=Zq8vR2mX9pL4tW7y", "  api_token: Zq8vR2mX9pL4tW7yB1nK",
                                  "set -e; GITLAB_TOKEN=Zq8vR2mX9pL4tW7yB1nK make deploy"])
def test_unquoted_credential_assignments_in_shell_env_and_config(line):
    assert find_pii(line) == []  # off by default (the data filters)
    matches = find_pii(line, unquoted_secrets=True)
    assert [m.kind for m in matches] == ["SECRET"] and line[matches[0].start:matches[0].end] == matches[0].text
    assert "=" not in matches[0].text and ":" not in matches[0].text


def test_unquoted_assignments_of_plain_values_are_kept():
    for text in ("DB_PASSWORD=changeme_changeme", "token = os.environ[X]", "secret_santa: everyone_gets_a_gift"):
        assert find_pii(text, unquoted_secrets=True) == [], text


@pytest.mark.parametrize(
    "text",
    [
        "ISBN 978-3-16-148410-0 and ISBN-13 9780306406157 are book numbers.",
        "ISBN 0-306-40615-2 is a ten digit one.",
        "Upgrade to version 1.2.3.4 of the package, or v10.0.0.1 if you must.",
        "The meeting is on 2024-01-15, at 10:30:00, or on 15/01/2024 or 01.02.2024.",
        "We sold 1234567 units for 98765432 dollars in 2023; pi is 3.14159265358979.",
        "The order number 4111111111111112 fails Luhn.",
        "std::vector<int> a::b; x = a::b::c;",
        "Population 331,449,281 in the 2020 census; ratio 0.123456789.",
        "Serial 000-12-3456 and 666-12-3456 and 912-34-5678 are not valid SSNs.",
        "INT_MAX is 2147483647, 3232235521 is an address as an integer, the ratio is +35236450.6.",
        "Step 2: 126382 - 38147 = 88235, and 44/132 - 84/132 = -40/132; then = 4155552671 + 3.",
    ],
)
def test_no_false_positives(text):
    assert find_pii(text) == []


def test_many_kinds_in_one_text_counts():
    text = ", ".join(PLANTED.values()) + ", " + SECRETS[0]
    _, counts = redact(text)
    assert counts == {k: 1 for k in KINDS}


def test_kind_subset_and_unknown_kind():
    text = "mail jane@example.com or call (415) 555-2671"
    assert [m.kind for m in find_pii(text, kinds=("EMAIL",))] == ["EMAIL"]
    with pytest.raises(ValueError):
        find_pii(text, kinds=("NAME",))
