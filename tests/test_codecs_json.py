"""JSON bodies and dotted paths of the JSON codec, against Python's json module."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatmw.codecs import JsonCodec, get_path, load_json_body


def reference_load(body: bytes) -> Any:
    """json.loads on bytes, then each lone surrogate replaced by U+FFFD."""
    document = json.loads(body)

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in value)
        if isinstance(value, list):
            return [clean(item) for item in value]
        if isinstance(value, dict):
            return {clean(key): clean(item) for key, item in value.items()}
        return value

    return clean(document)


DOCUMENT = {"user_id": "u1", "message": "caf\u00e9 \U0001f600", "n": [1, 2.5, None, True]}
BODIES = [
    json.dumps(DOCUMENT).encode(),
    json.dumps(DOCUMENT, ensure_ascii=False).encode(),
    json.dumps(DOCUMENT, ensure_ascii=False).encode("utf-16-le"),
    json.dumps(DOCUMENT, ensure_ascii=False).encode("utf-16-be"),
    json.dumps(DOCUMENT, ensure_ascii=False).encode("utf-16"),
    json.dumps(DOCUMENT, ensure_ascii=False).encode("utf-32"),
    b"\xef\xbb\xbf" + json.dumps(DOCUMENT).encode(),
    b'  {"a": 1}  ',
    b'[1, "two"]',
    b'"text"',
    b"12",
    b'{"lone": "\\ud800 and \\udfff"}',
    b'{"raw": "\xed\xa0\x80"}',
    b'{"pair": "\\ud83d\\ude00"}',
    b'{"k\\ud800": ["\\udc00"]}',
]


@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
def test_load_json_body_matches_json(body: bytes) -> None:
    assert load_json_body(body) == reference_load(body)


@pytest.mark.parametrize("body, expected", [
    (b'{"a": 1', "body is not valid JSON"),
    (b'{"a": "\xff"}', "body is not valid JSON: 'utf-8' codec can't decode"),
    (b"{}{}", "body is not valid JSON: Extra data"),
    (b"", "body is not valid JSON"),
    (b"{", "body is not valid JSON"),
    (b"[" * 100_000, "body is not valid JSON"),
])
def test_load_json_body_invalid(body: bytes, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        load_json_body(body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(document=st.dictionaries(st.text(max_size=4), json_values, max_size=4),
       ascii_only=st.booleans())
def test_load_json_body_any_document(document: dict[str, Any], ascii_only: bool) -> None:
    body = json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    assert load_json_body(body) == reference_load(body)


def reference_get(document: Any, path: str | None) -> Any:
    """Walk the dotted path one part at a time, as documented."""
    if path is None:
        return None
    value = document
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() \
                and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


NESTED = {"a": {"b": [{"c": "deep"}, None]}, "x": None, "y": 0, "": "empty", "1": "one"}
PATHS = [None, "a", "x", "y", "", "1", "missing", "a.b", "a.b.0.c", "a.b.-2.c", "a.b.1",
         "a.b.5", "a.b.1.c", "a.b.c", "y.z", "a..b", "a.b.0.c.d"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("document", [NESTED, OrderedDict(NESTED), [NESTED], "text", None],
                         ids=["dict", "ordered", "list", "str", "none"])
def test_get_path_matches_reference(document: Any, path: str | None) -> None:
    assert get_path(document, path) == reference_get(document, path)


def test_json_codec_utf16_request() -> None:
    codec = JsonCodec()
    body = json.dumps({"user_id": 7, "message": "h\u00e9"}).encode("utf-16-le")
    request = codec.decode_request(body)
    assert request is not None
    assert request.user_id == "7"
    assert request.text == "h\u00e9"
