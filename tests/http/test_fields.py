"""``http1.parse_fields``, the header-block parser both sides share, on the edges its one-pass pattern must get right.

tests/http/test_differential.py referees it against llhttp through the real front and upstream
client; these cases pin what a one-pass ``findall`` could get wrong: a line that matches only in
part, a stray CR or LF, whitespace after a value, and which failure a block that is both malformed
and not UTF-8 reports.
"""

from __future__ import annotations

import pytest

from proxy.http.http1 import parse_fields

CASES = {
    "empty": (b"", []),
    "one": (b"Host: a\r\n", [("Host", "a")]),
    "whitespace around a value, kept inside it": (b"X:  a \t b \t\r\n", [("X", "a \t b")]),
    "empty value": (b"X:\r\nY: \t\r\n", [("X", ""), ("Y", "")]),
    "repeats and order kept": (b"B: 1\r\na: 2\r\nb: 3\r\n", [("B", "1"), ("a", "2"), ("b", "3")]),
    "obs-text kept as surrogates": (b"X: \xff\r\n", [("X", "\udcff")]),
    "UTF-8 value": (b"X: caf\xc3\xa9\r\n", [("X", "café")]),
    "no final CRLF": (b"A: 1\r\nB: 2", None),
    "bare LF ending a line": (b"A: 1\nB: 2\r\n", None),
    "bare LF inside a value": (b"A: 1\nx\r\n", None),
    "bare CR inside a value": (b"A: 1\rB: 2\r\n", None),
    "a name that is not a token": (b"A B: 1\r\n", None),
    "a valid line after an invalid one": (b"bad line\r\nB: 2\r\n", None),
    "a line matching only from its middle": (b" X: 1\r\n", None),
    "obs-fold": (b"A: 1\r\n 2\r\n", None),
    "control character": (b"A: 1\x002\r\n", None),
    "DEL": (b"A: \x7f\r\n", None),
    "non-ASCII name": (b"\xc3\xa9: 1\r\n", None),
    "empty line inside": (b"A: 1\r\n\r\nB: 2\r\n", None),
}


@pytest.mark.parametrize("case", CASES)
def test_parse_fields(case: str) -> None:
    block, expected = CASES[case]
    assert parse_fields(block, "surrogateescape") == expected


def test_strict_decoding_refuses_malformed_before_it_refuses_non_utf8() -> None:
    """A block both malformed and not UTF-8 is malformed (None), as when the shape was checked first."""
    assert parse_fields(b"A B: \xff\r\n") is None
    with pytest.raises(UnicodeDecodeError):
        parse_fields(b"A: \xff\r\n")
    assert parse_fields(b"A: caf\xc3\xa9\r\n") == [("A", "café")]
