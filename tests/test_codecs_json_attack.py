"""load_json_body on UTF-16 and UTF-32 bodies: lone surrogates are replaced there too.

``json.loads`` detects these encodings from the first bytes, and decodes a lone
surrogate, escaped or raw, into a string that has no UTF-8 encoding.
"""

from __future__ import annotations

import pytest

from chatmw.codecs import load_json_body

ENCODINGS = ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be")


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_escaped_lone_surrogate_replaced(encoding: str) -> None:
    body = '{"text": "a\\ud800b", "list": ["\\udfff"]}'.encode(encoding)
    assert load_json_body(body) == {"text": "a\ufffdb", "list": ["\ufffd"]}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_raw_lone_surrogate_replaced(encoding: str) -> None:
    body = '{"t\udc00": "x\ud83d"}'.encode(encoding, "surrogatepass")
    assert load_json_body(body) == {"t\ufffd": "x\ufffd"}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_surrogate_pair_kept(encoding: str) -> None:
    body = '{"a": "\\ud83d\\ude00", "b": "\U0001f600", "n": [1, null, true]}'.encode(encoding)
    assert load_json_body(body) == {"a": "\U0001f600", "b": "\U0001f600", "n": [1, None, True]}


@pytest.mark.parametrize("body, document", [
    (b'\xef\xbb\xbf{"a": "\\ud800"}', {"a": "\ufffd"}),
    (b' {"a": "\\ud800"}', {"a": "\ufffd"}),
    (b'"\\ud800"', "\ufffd"),
])
def test_utf8_other_openings_replaced(body: bytes, document: object) -> None:
    # A BOM, leading space or a bare string skips the direct UTF-8 decoding.
    assert load_json_body(body) == document
