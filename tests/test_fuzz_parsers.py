"""Property tests of every input parser: no input raises anything but the parser's own error.

Each parser either returns a well-formed result or rejects the input with its documented
error type (``WebhookFormatError``, ``CodecError``, ``FilterError``, a skipped import row),
whose message names the field and the problem.
"""

from __future__ import annotations

import csv
import io
import json
import string
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from chatmw import events as ev
from chatmw.adapters import messenger, whatsapp
from chatmw.adapters._meta import MetaSettings, sign, time_from_epoch
from chatmw.adapters.webhook import WebhookFormatError, WebhookIntake, parse_webhook
from chatmw.app_config import parse_app_config
from chatmw.business import SpendRowError, parse_spend_csv
from chatmw.cli import app
from chatmw.codecs import ChatRequest, CodecError, JsonCodec, RasaCodec, replace_lone_surrogates
from chatmw.importers import Skipped, TextFile, open_source
from chatmw.importers.source import Row
from chatmw.metrics.filters import COMMON_PARAMS, FilterError, MetricFilter, parse_filter
from chatmw.surveys.answers import Answer, parse_answer, parse_payload
from chatmw.surveys.config import parse_config

RECEIVED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Scalars that break naive code: huge and negative numbers, NaN, numeric strings, odd text.
NASTY_TEXT = st.sampled_from([
    "", " ", "\x00", "a\x00b", "\ud800", "\udfff", "😀", "e\u0301", "\u202eabc", "مرحبا",
    "ſix", "eİns", "١٢", "9" * 40, "-1", "1e309", "NaN", "null", "{}", "[]",
])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 2**63, -(2**63), 10**11, 10**14, 10**20]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    NASTY_TEXT,
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=10), children, max_size=4),
    ),
    max_leaves=20,
)
TIMESTAMPS = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=0, max_value=10**14).map(str),
    st.sampled_from(["1527459824", "1697045000.5", "-5", "", "soon", "1e400"]),
    JSON,
)


def maybe(documented: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The documented value most of the time, otherwise any JSON value."""
    return st.one_of(documented, documented, documented, JSON)


def objects(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """A JSON object with the documented fields, each possibly missing or of any type."""
    optional = {name: maybe(value) for name, value in fields.items()}
    return st.fixed_dictionaries({}, optional=optional)


IDS = st.one_of(st.text(string.digits, min_size=1, max_size=20), st.integers(0, 10**20), NASTY_TEXT)
REFERRAL = objects({"ref": st.text(max_size=300), "source": st.sampled_from(["ADS", "SHORTLINK"]),
                    "type": st.text(max_size=10), "ad_id": IDS,
                    "referer_uri": st.text(max_size=600),
                    "ads_context_data": objects({"ad_title": st.text(), "photo_url": st.text()}),
                    "product": objects({"id": IDS})})
MESSENGER_ITEM = objects({
    "sender": objects({"id": IDS, "user_ref": IDS}),
    "recipient": objects({"id": IDS}),
    "timestamp": TIMESTAMPS,
    "message": objects({"mid": IDS, "text": st.text(), "is_echo": st.booleans(), "app_id": IDS,
                        "metadata": st.text(), "quick_reply": objects({"payload": st.text()}),
                        "reply_to": objects({"mid": IDS}), "referral": REFERRAL,
                        "attachments": st.lists(objects({"type": st.text()}), max_size=3)}),
    "postback": objects({"mid": IDS, "title": st.text(), "payload": st.text(),
                         "referral": REFERRAL}),
    "referral": REFERRAL,
    "delivery": objects({"mids": st.lists(IDS, max_size=3), "watermark": TIMESTAMPS}),
    "read": objects({"watermark": TIMESTAMPS}),
    "reaction": objects({"mid": IDS, "action": st.sampled_from(["react", "unreact"]),
                         "emoji": st.text(max_size=3), "reaction": st.text(max_size=10)}),
    "optin": objects({"ref": st.text(), "type": st.text()}),
})
MESSENGER = objects({
    "object": st.sampled_from(["page", "instagram"]),
    "entry": st.lists(objects({
        "id": IDS,
        "time": TIMESTAMPS,
        "messaging": st.lists(MESSENGER_ITEM, max_size=3),
        "standby": st.lists(MESSENGER_ITEM, max_size=2),
        "changes": st.lists(objects({"field": st.text(), "value": MESSENGER_ITEM}), max_size=2),
    }), max_size=3),
})
WA_MESSAGE = objects({
    "from": IDS,
    "id": IDS,
    "timestamp": TIMESTAMPS,
    "type": st.sampled_from(["text", "image", "interactive", "button", "reaction", "system",
                             "contacts", "location", "unsupported", "sticker"]),
    "text": objects({"body": st.text()}),
    "image": objects({"caption": st.text(), "mime_type": st.text()}),
    "interactive": objects({"type": st.sampled_from(["button_reply", "list_reply"]),
                            "button_reply": objects({"id": IDS, "title": st.text()}),
                            "list_reply": objects({"id": IDS, "title": st.text()})}),
    "button": objects({"text": st.text(), "payload": st.text()}),
    "reaction": objects({"message_id": IDS, "emoji": st.text(max_size=3)}),
    "system": objects({"type": st.text()}),
    "context": objects({"id": IDS, "forwarded": st.booleans()}),
    "errors": st.lists(objects({"code": IDS, "title": st.text()}), max_size=2),
    "referral": objects({"source_type": st.sampled_from(["ad", "post"]), "source_id": IDS,
                         "source_url": st.text(max_size=600), "ctwa_clid": st.text(max_size=600),
                         "headline": st.text()}),
})
WHATSAPP = objects({
    "object": st.just("whatsapp_business_account"),
    "entry": st.lists(objects({"id": IDS, "changes": st.lists(objects({
        "field": st.sampled_from(["messages", "message_template_status_update"]),
        "value": objects({
            "metadata": objects({"phone_number_id": IDS}),
            "contacts": st.lists(objects({"wa_id": IDS, "user_id": IDS}), max_size=2),
            "messages": st.lists(WA_MESSAGE, max_size=3),
            "statuses": st.lists(objects({"id": IDS, "status": st.text(max_size=10),
                                          "timestamp": TIMESTAMPS, "recipient_id": IDS,
                                          "errors": st.lists(objects({"code": IDS}), max_size=2)}),
                                 max_size=3),
            "errors": st.lists(objects({"code": IDS}), max_size=2),
        }),
    }), max_size=2)}), max_size=2),
})


def dumps(document: Any) -> bytes:
    # surrogatepass keeps lone surrogates as the bytes a careless sender would produce.
    return json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")


def check_events(found: list[ev.Event]) -> None:
    assert isinstance(found, list)
    for event in found:
        assert isinstance(event, ev.Event)
        assert event.occurred_at.tzinfo is not None
        ev.to_ms(event.occurred_at)
        if isinstance(event, ev.Message | ev.Touch):
            assert isinstance(event.user_id, str)
            assert event.user_id
            assert isinstance(event.key, str)
            assert len(event.key) <= 255 or event.key.startswith(f"{event.channel}:")
        if isinstance(event, ev.Message):
            assert event.text is None or isinstance(event.text, str)
        if isinstance(event, ev.RawPayload):
            assert isinstance(event.body, bytes)
            assert event.reason


def parse_or_reject(body: bytes) -> list[ev.Event] | None:
    try:
        return parse_webhook(body, RECEIVED)
    except WebhookFormatError as error:
        assert str(error)
        return None


@FUZZ
@given(MESSENGER)
def test_messenger_parser_any_shape(document: dict[str, Any]) -> None:
    found = parse_or_reject(dumps({"object": "page", **document}))
    if found is not None:
        check_events(found)


@FUZZ
@given(WHATSAPP)
def test_whatsapp_parser_any_shape(document: dict[str, Any]) -> None:
    found = parse_or_reject(dumps({"object": "whatsapp_business_account", **document}))
    if found is not None:
        check_events(found)


@FUZZ
@given(JSON)
def test_webhook_parser_any_json(document: Any) -> None:
    found = parse_or_reject(dumps(document))
    if found is not None:
        check_events(found)


@FUZZ
@given(st.binary(max_size=300))
def test_webhook_parser_any_bytes(body: bytes) -> None:
    found = parse_or_reject(body)
    if found is not None:
        check_events(found)


@pytest.mark.parametrize("body", [
    b"1" * 5000,
    b"[" * 100_000,
    b'{"object": "page", "entry": [' * 3000,
    b'{"object": "page", "entry": [{"time": ' + b"9" * 5000 + b"}]}",
    b'\xef\xbb\xbf{"object": "page"}',
    b'{"object": "page", "entry": [{"messaging": [{"sender": {"id": "\\ud800"}}]}]}',
])
def test_webhook_parser_pathological_bodies(body: bytes) -> None:
    found = parse_or_reject(body)
    if found is not None:
        check_events(found)


@pytest.mark.parametrize("body", [b"1" * 5000, b"[" * 100_000])
def test_webhook_parser_rejects_json_limits(body: bytes) -> None:
    with pytest.raises(WebhookFormatError, match="not valid JSON"):
        parse_webhook(body, RECEIVED)


@FUZZ
@given(TIMESTAMPS)
def test_meta_timestamps_never_raise(value: Any) -> None:
    moment = time_from_epoch(value, RECEIVED)
    assert moment.tzinfo is not None
    ev.to_ms(moment)


@FUZZ
@given(MESSENGER_ITEM)
def test_messenger_item_any_shape(item: dict[str, Any]) -> None:
    # parse_webhook hands the item parsers decoded JSON, where lone surrogates are replaced.
    check_events(messenger.parse_item(replace_lone_surrogates(item), "PAGE", RECEIVED))


@FUZZ
@given(objects({"messages": st.lists(WA_MESSAGE, max_size=3)}))
def test_whatsapp_value_any_shape(value: dict[str, Any]) -> None:
    check_events(whatsapp.parse_value(replace_lone_surrogates(value), RECEIVED))


class ListSink:
    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    def submit(self, event: ev.Event) -> bool:
        self.events.append(event)
        return True


SECRET = "fuzz-app-secret"


@FUZZ
@given(st.one_of(st.binary(max_size=400), MESSENGER.map(dumps), WHATSAPP.map(dumps)))
def test_intake_signed_body_always_acknowledged(body: bytes) -> None:
    sink = ListSink()
    intake = WebhookIntake(MetaSettings(app_secret=SECRET, verify_token="token"), sink)

    outcome = intake.receive(body, sign(body, SECRET), RECEIVED)

    assert outcome.status == 200
    assert outcome.events == len(sink.events)
    check_events(sink.events)
    if outcome.events == 0:
        return
    raw = [event for event in sink.events if isinstance(event, ev.RawPayload)]
    if intake.stats["unparseable"]:
        assert [event.body for event in raw] == [body]


# Codecs

RASA_REQUEST = objects({"sender": IDS, "message": st.text(),
                        "metadata": objects({"conversation_id": IDS, "channel": st.text()})})
JSON_REQUEST = objects({"user_id": IDS, "message": st.text(),
                        "session": objects({"id": IDS}), "plan": st.text()})
CODECS: list[tuple[str, Any]] = [
    ("rasa", RasaCodec()),
    ("json", JsonCodec(conversation_id_path="session.id", replies_path="replies",
                       reply_intent_path="intent", reply_ended_path="ended",
                       attribute_paths={"plan": "plan"})),
    ("json-paths", JsonCodec(text_path="a.0.b", user_id_path="u.-1", replies_path="r.-2.x")),
]
REQUEST = ChatRequest(user_id="u1", text="hello")


def decode_request_or_reject(codec: Any, body: bytes) -> ChatRequest | None:
    try:
        request = codec.decode_request(body)
    except CodecError as error:
        assert str(error)
        return None
    assert request is not None
    assert isinstance(request.user_id, str)
    assert request.text is None or isinstance(request.text, str)
    assert all(isinstance(value, str) for value in request.attributes.values())
    return request


def decode_response_or_reject(codec: Any, body: bytes) -> None:
    try:
        replies = codec.decode_response(body, REQUEST)
    except CodecError as error:
        assert str(error)
        return
    for reply in replies:
        assert reply.text is None or isinstance(reply.text, str)
        assert reply.ended in (None, True, False)


@pytest.mark.parametrize(("name", "codec"), CODECS, ids=[name for name, _ in CODECS])
@FUZZ
@given(body=st.one_of(st.binary(max_size=200), JSON.map(dumps), RASA_REQUEST.map(dumps),
                      JSON_REQUEST.map(dumps)))
def test_codec_decode_request_any_body(name: str, codec: Any, body: bytes) -> None:
    decode_request_or_reject(codec, body)


@pytest.mark.parametrize(("name", "codec"), CODECS, ids=[name for name, _ in CODECS])
@FUZZ
@given(body=st.one_of(st.binary(max_size=200), JSON.map(dumps),
                      st.lists(objects({"text": st.text(), "recipient_id": IDS}),
                               max_size=3).map(dumps),
                      objects({"replies": JSON}).map(dumps)))
def test_codec_decode_response_any_body(name: str, codec: Any, body: bytes) -> None:
    decode_response_or_reject(codec, body)


@pytest.mark.parametrize(("name", "codec"), CODECS, ids=[name for name, _ in CODECS])
@pytest.mark.parametrize("body", [b"1" * 5000, b"[" * 100_000, b'{"sender": ' * 50_000])
def test_codec_rejects_json_limits(name: str, codec: Any, body: bytes) -> None:
    with pytest.raises(CodecError, match="not valid JSON"):
        codec.decode_request(body)
    with pytest.raises(CodecError, match="not valid JSON"):
        codec.decode_response(body, REQUEST)


# Transcript import rows

CELLS = st.one_of(st.text(max_size=40), NASTY_TEXT, st.sampled_from([
    "2024-03-01T09:00:00Z", "2024-03-01T09:00:00", "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-14:00", "user", "bot", "agent", "USER", "x" * 300,
]))
ROW = st.fixed_dictionaries({}, optional={
    "conversation_id": CELLS, "timestamp": CELLS, "role": CELLS, "text": CELLS,
    "message_id": CELLS, "user_id": CELLS, "channel": CELLS, "company": CELLS,
    "x" * 70: CELLS,
})
JSONL_VALUE = st.one_of(CELLS, SCALARS, JSON)


def import_rows(path: Path, file_format: str) -> list[Row | Skipped]:
    source = open_source(TextFile(path), file_format)
    source.scan()
    return list(source.rows())


def check_rows(items: list[Row | Skipped], lines: int) -> None:
    for item in items:
        assert 1 <= item.line <= lines
        if isinstance(item, Skipped):
            assert item.reason
            continue
        message = item.message
        assert message.role in ev.ROLES
        assert message.occurred_at.tzinfo is not None
        assert len(message.key) <= 255
        assert len(message.user_id) <= 255
        assert len(message.channel) <= 32


@FUZZ
@given(rows=st.lists(st.fixed_dictionaries({}, optional={
    "conversation_id": JSONL_VALUE, "timestamp": JSONL_VALUE, "role": JSONL_VALUE,
    "text": JSONL_VALUE, "user_id": JSONL_VALUE, "channel": JSONL_VALUE, "plan": JSONL_VALUE,
}), min_size=1, max_size=5),
       junk=st.sampled_from(["", "not json", "[1, 2]", "1" * 5000, "[" * 5000]))
def test_jsonl_rows_any_values(tmp_path: Path, rows: list[dict[str, Any]], junk: str) -> None:
    path = tmp_path / "rows.jsonl"
    # ASCII escapes: a lone surrogate arrives as "\\ud800", the only way UTF-8 text can carry one.
    lines = [json.dumps(row) for row in rows] + [junk]
    path.write_text("\n".join(lines), encoding="utf-8")

    items = import_rows(path, "jsonl")

    check_rows(items, len(lines))
    if junk.strip():
        assert isinstance(items[-1], Skipped)
        assert items[-1].line == len(lines)


@FUZZ
@given(rows=st.lists(ROW, min_size=1, max_size=5))
def test_csv_rows_any_values(tmp_path: Path, rows: list[dict[str, str]]) -> None:
    path = tmp_path / "rows.csv"
    header = ["conversation_id", "timestamp", "role", "text", "message_id", "user_id", "channel",
              "company"]
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for row in rows:
            # A CSV file is UTF-8 text, so it cannot hold a lone surrogate.
            writer.writerow([replace_lone_surrogates(row.get(name, "")) for name in header])

    # A quoted cell may hold any number of line breaks, so the bound comes from the file:
    # each "\n" or "\r" byte may end a physical line.
    data = path.read_bytes()
    check_rows(import_rows(path, "csv"), 1 + data.count(b"\n") + data.count(b"\r"))


def test_csv_invalid_utf8_rejected_whole(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"conversation_id,timestamp,role,text\n"
                     b"c1,2024-03-01T09:00:00Z,user,caf\xe9\n")

    result = CliRunner().invoke(app, ["import", str(path), "--db", f"sqlite:///{tmp_path}/x.db"])

    assert result.exit_code == 1
    assert "is not valid UTF-8" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


# Survey answers

SCALES = st.sampled_from([(1, 5), (0, 10)])


@FUZZ
@given(text=st.one_of(st.none(), st.text(max_size=40), NASTY_TEXT,
                      st.from_regex(r"\A(survey:\d{1,20}:(range:)?\d{1,3}(-\d{1,3})?)\Z")),
       payload=st.one_of(st.none(), st.text(max_size=30)), scale=SCALES)
def test_survey_answer_any_text(text: str | None, payload: str | None,
                                scale: tuple[int, int]) -> None:
    answer = parse_answer(text, payload, scale)

    assert answer is None or isinstance(answer, Answer)
    if answer is not None and answer.score is not None:
        assert scale[0] <= answer.score <= scale[1]
    if answer is not None and answer.score_range is not None:
        assert scale[0] <= answer.score_range[0] <= answer.score_range[1] <= scale[1]


@pytest.mark.parametrize("text", ["ſix", "eİns", "ſieben", "ſeis"])
def test_survey_answer_casefold_lookalikes(text: str) -> None:
    assert parse_answer(text, None, (0, 10)) is None


@FUZZ
@given(payload=st.text(max_size=40), scale=SCALES)
def test_survey_payload_any_text(payload: str, scale: tuple[int, int]) -> None:
    answer = parse_payload(payload, scale)
    assert answer is None or answer.survey_id is not None


# Metric filters

PARAM_NAMES = st.one_of(st.sampled_from([*COMMON_PARAMS, "format", "attr.plan", "attr.", "attr.a b",
                                         "attr." + "x" * 65, "limit"]),
                        st.text(max_size=10))
DATES = st.one_of(
    st.sampled_from(["2024-03-01", "2024-03-01T09:00:00Z", "0001-01-01", "9999-12-31T23:59",
                     "0005-01-01", "0010-01-01", "2024-02-30", "2024-03-01T25:00", "z", ""]),
    st.datetimes().map(datetime.isoformat),
    st.text(max_size=20),
)
PARAM_VALUES = st.one_of(DATES, NASTY_TEXT, st.text(max_size=300), st.sampled_from([
    "UTC", "Asia/Tokyo", "Pacific/Kiritimati", "Etc/GMT+12", "channel", "attr:plan", "attr:",
    "source", "first", "last", "web,messenger", ",", "../../etc/passwd",
]))


def check_filter_result(params: dict[str, list[str]]) -> None:
    try:
        flt = parse_filter(params, now=RECEIVED)
    except FilterError as error:
        assert error.param in params or error.param in ("since", "until", "tz")
        assert error.message
        return
    assert isinstance(flt, MetricFilter)
    flt.describe()
    assert (flt.since_ms is None) == (flt.since is None)
    assert flt.until_ms is None or flt.since_ms is None or flt.until_ms > flt.since_ms
    flt.shifted_back()


@FUZZ
@given(st.dictionaries(PARAM_NAMES, st.lists(PARAM_VALUES, min_size=1, max_size=2), max_size=5))
def test_parse_filter_any_params(params: dict[str, list[str]]) -> None:
    check_filter_result(params)


@FUZZ
@given(since=DATES, until=DATES, tz=st.sampled_from(["UTC", "Asia/Tokyo", "Pacific/Kiritimati",
                                                     "Etc/GMT+12", "America/Los_Angeles"]))
def test_parse_filter_any_window(since: str, until: str, tz: str) -> None:
    check_filter_result({"since": [since], "until": [until], "tz": [tz]})


@pytest.mark.parametrize("params", [
    {"since": ["0001-01-01"], "tz": ["Asia/Tokyo"]},
    {"since": ["9999-12-31T23:00"], "until": ["9999-12-31T23:30"], "tz": ["America/Los_Angeles"]},
])
def test_parse_filter_out_of_range_dates(params: dict[str, list[str]]) -> None:
    with pytest.raises(FilterError) as caught:
        parse_filter(params, now=RECEIVED)
    assert caught.value.param in params
    assert "out of range" in caught.value.message


def test_filter_early_window_has_no_previous() -> None:
    flt = parse_filter({"since": ["0005-01-01"], "until": ["0010-01-01"]}, now=RECEIVED)
    assert flt.shifted_back() is None



@pytest.mark.parametrize("param", ["channel", "attr.plan", "source", "campaign"])
def test_parse_filter_rejects_lone_surrogates(param: str) -> None:
    with pytest.raises(FilterError) as caught:
        parse_filter({param: ["web\udcff"]}, now=RECEIVED)
    assert caught.value.param == param
    assert caught.value.message == "value is not valid UTF-8"


def test_metrics_cli_invalid_utf8_argument(tmp_path: Path) -> None:
    # The command line decodes the byte 0xff in an argument to the lone surrogate U+DCFF.
    database = f"sqlite:///{tmp_path}/metrics.db"
    result = CliRunner().invoke(app, ["metrics", "summary", "--db", database,
                                      "--channel", "web\udcff"])

    assert result.exit_code == 2, result.output
    assert "invalid --channel: value is not valid UTF-8" in result.output


# Spend CSV

SPEND_CELLS = st.one_of(CELLS, st.sampled_from(["2026-03-01", "web", "12.50", "EUR", "-1", "1e400",
                                                "NaN", "w" * 40, "\x00"]))


@FUZZ
@given(rows=st.lists(st.lists(SPEND_CELLS, min_size=0, max_size=6), max_size=5),
       header=st.sampled_from(["day,channel,amount", "day,channel,campaign,amount,currency",
                               "day,amount", "day,channel,amount,amount", ""]))
def test_spend_csv_any_rows(rows: list[list[str]], header: str) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in rows:
        writer.writerow([replace_lone_surrogates(cell) for cell in row])
    text = f"{header}\n{buffer.getvalue()}"

    try:
        events = parse_spend_csv(text, "EUR")
    except SpendRowError as error:
        assert 0 < error.line <= text.count("\n") + 2
        assert error.column
        return
    for event in events:
        assert 0 < len(event.channel) <= 32
        assert event.amount_micros >= 0


def test_spend_csv_oversized_field_named() -> None:
    text = "day,channel,amount\n2026-03-01,web," + "9" * 200_000 + "\n"

    with pytest.raises(SpendRowError) as caught:
        parse_spend_csv(text, "EUR")

    # The transcript importer raises csv.field_size_limit() for the whole process, so the
    # field may reach the amount check instead of failing in the CSV reader.
    assert caught.value.line == 2


# The Customer Support on Twitter format

TWCS_HEADER = ["tweet_id", "author_id", "inbound", "created_at", "text", "response_tweet_id",
               "in_response_to_tweet_id"]
TWEET_IDS = st.one_of(st.integers(0, 10**20).map(str), st.sampled_from(["", "1.0", "²", "٣", "-1",
                                                                       "1,2", "x" * 300]), CELLS)
TWCS_ROW = st.fixed_dictionaries({
    "tweet_id": TWEET_IDS, "author_id": st.one_of(st.text(max_size=20), st.just("a" * 300)),
    "inbound": st.sampled_from(["True", "False", "1", "0", "yes", ""]),
    "created_at": st.one_of(st.sampled_from([
        "Wed Oct 11 06:55:44 +0000 2017", "Wed Oct 11 06:55:44 -1400 0001",
        "Fri Dec 31 23:59:59 +1400 9999", "Wed Foo 11 06:55:44 +0000 2017",
        "Wed Oct ² 06:55:44 +0000 2017"]), CELLS),
    "text": CELLS, "response_tweet_id": TWEET_IDS, "in_response_to_tweet_id": TWEET_IDS,
})


@FUZZ
@given(rows=st.lists(TWCS_ROW, min_size=1, max_size=5))
def test_twcs_rows_any_values(tmp_path: Path, rows: list[dict[str, str]]) -> None:
    path = tmp_path / "twcs.csv"
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(TWCS_HEADER)
        for row in rows:
            writer.writerow([replace_lone_surrogates(row[name]) for name in TWCS_HEADER])

    check_rows(import_rows(path, "twcs"), 1 + len(rows) * 3)


# Configuration files

EXAMPLE_CONFIG = tomllib.loads(
    (Path(__file__).resolve().parent.parent / "examples" / "chatmw.toml").read_text())
EXAMPLE_SURVEYS = tomllib.loads(
    (Path(__file__).resolve().parent.parent / "examples" / "surveys.toml").read_text())
TOML_VALUES = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=20),
    st.sampled_from(["", "09:00-17:00", "25:00-26:00", "Mars/Phobos", "EUR", "eur", "-1", "nan"]),
    st.lists(st.text(max_size=12), max_size=3), st.dictionaries(st.text(max_size=8),
                                                               st.text(max_size=8), max_size=2),
    st.datetimes().map(lambda moment: moment.date()),
)


def perturbed(document: Any, data: st.DataObject, depth: int = 0) -> Any:
    """Return ``document`` with some values replaced, some keys dropped and one key added."""
    if not isinstance(document, dict) or depth > 4:
        return data.draw(st.one_of(st.just(document), TOML_VALUES)) if depth else document
    changed = {}
    for key, value in document.items():
        choice = data.draw(st.sampled_from(["keep", "keep", "change", "drop"]))
        if choice == "keep":
            changed[key] = value
        elif choice == "change":
            changed[key] = perturbed(value, data, depth + 1)
    if data.draw(st.booleans()):
        # Keys such as "a.b" or "" would make the dotted setting names in errors ambiguous.
        changed[data.draw(st.from_regex(r"\A[a-z_]{1,10}\Z"))] = data.draw(TOML_VALUES)
    return changed


def check_config_error(error: ValueError, document: Any) -> None:
    # Every message starts with the dotted name of the setting, then ": " or " must".
    message = str(error)
    name = message.split(": ")[0].split(" must ")[0]
    assert len(name) < len(message), message
    assert " " not in name, message
    top = name.split(".")[0]
    assert top in document or top in ("surveys", "dispatcher", "business"), message


@FUZZ
@given(data=st.data())
def test_app_config_any_values(data: st.DataObject) -> None:
    document = perturbed(EXAMPLE_CONFIG | EXAMPLE_SURVEYS, data)
    try:
        parse_app_config(document, database_url="sqlite:///unused.db", environ={})
    except ValueError as error:
        check_config_error(error, document)


@FUZZ
@given(data=st.data())
def test_survey_config_any_values(data: st.DataObject) -> None:
    document = perturbed(EXAMPLE_SURVEYS, data)
    try:
        parse_config(document)
    except ValueError as error:
        check_config_error(error, document)
