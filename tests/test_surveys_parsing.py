"""Survey configuration, answer parsing and per-channel rendering."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from chatmw.adapters.messenger import build_send_request as messenger_request
from chatmw.adapters.whatsapp import build_send_request as whatsapp_request

from chatmw.surveys.answers import parse_answer, range_payload, score_payload
from chatmw.surveys.config import load_config, parse_config
from chatmw.surveys.render import RenderRequest, render

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "surveys.toml"
CSAT, NPS = (1, 5), (0, 10)


def _document() -> dict[str, Any]:
    return {
        "surveys": {
            "main": {
                "kind": "csat",
                "channels": ["web"],
                "texts": {"en": {"prompt": "Rate us", "reask": "1-5 please"}},
            }
        }
    }


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE)
    assert sorted(config.surveys) == ["csat", "nps"]
    assert config.for_channel("whatsapp").kind == "nps"
    assert config.surveys["nps"].whatsapp_template.name == "nps_survey"
    assert parse_config(config.to_document()) == config


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("surveys", "main", "kind"), "ces", "surveys.main.kind: expected one of csat, nps"),
        (
            ("surveys", "main", "sampling_rate"),
            1.5,
            "surveys.main.sampling_rate: must be at most 1",
        ),
        (
            ("surveys", "main", "sampling_rate"),
            -0.1,
            "surveys.main.sampling_rate: must be at least 0",
        ),
        (
            ("surveys", "main", "delay_minutes"),
            -1,
            "surveys.main.delay_minutes: must be at least 0",
        ),
        (("surveys", "main", "cooldown_days"), "x", "surveys.main.cooldown_days: must be a finite"),
        (("surveys", "main", "trigger"), "closed", "surveys.main.trigger: expected one of"),
        (
            ("surveys", "main", "inactivity_minutes"),
            0,
            "surveys.main.inactivity_minutes: must be positive",
        ),
        (("surveys", "main", "channels"), ["sms"], "surveys.main.channels: unknown channel 'sms'"),
        (("surveys", "main", "channels"), [], "surveys.main.channels: must be a non-empty list"),
        (
            ("surveys", "main", "default_locale"),
            "de",
            "surveys.main.default_locale: no texts for 'de'",
        ),
        (
            ("surveys", "main", "texts", "en", "prompt"),
            "",
            "surveys.main.texts.en.prompt: must be a non-empty",
        ),
        (
            ("surveys", "main", "texts", "en", "list_button"),
            "x" * 21,
            "surveys.main.texts.en.list_button: longer than 20 characters",
        ),
        (
            ("surveys", "main", "texts", "en", "colour"),
            "red",
            "surveys.main.texts.en.colour: unknown setting",
        ),
        (("surveys", "main", "delay"), 5, "surveys.main.delay: unknown setting"),
        (("dispatcher", "batch_size"), 0, "dispatcher.batch_size: must be at least 1"),
        (("dispatcher", "max_attempts"), 1.5, "dispatcher.max_attempts: must be an integer"),
        (
            ("dispatcher", "outbound"),
            {"web": "no-colon"},
            "dispatcher.outbound.web: expected 'module:callable'",
        ),
    ],
)
def test_invalid_setting_named(path: tuple[str, ...], value: Any, message: str) -> None:
    document = copy.deepcopy(_document())
    target = document
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    with pytest.raises(ValueError) as caught:
        parse_config(document)
    assert str(caught.value).startswith(message)


def test_missing_prompt_named() -> None:
    document = _document()
    del document["surveys"]["main"]["texts"]["en"]["prompt"]
    with pytest.raises(ValueError, match=r"^surveys\.main\.texts\.en\.prompt: missing"):
        parse_config(document)


def test_channel_in_two_surveys_rejected() -> None:
    document = _document()
    document["surveys"]["other"] = copy.deepcopy(document["surveys"]["main"])
    with pytest.raises(
        ValueError, match=r"^surveys\.other\.channels: channel 'web' is already covered"
    ):
        parse_config(document)


def test_invalid_toml_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[surveys.main\nkind = 'csat'\n")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "scale", "score", "comment"),
    [
        ("4", CSAT, 4, None),
        ("  5. ", CSAT, 5, None),
        ("10/10", NPS, 10, None),
        ("8 / 10", NPS, 8, None),
        ("4 out of 5", CSAT, 4, None),
        ("⭐⭐⭐⭐", CSAT, 4, None),
        ("⭐ ⭐ ⭐", CSAT, 3, None),
        ("★★☆☆☆", CSAT, 2, None),
        ("four", CSAT, 4, None),
        ("Ten!", NPS, 10, None),
        ("zero", NPS, 0, None),
        ("diez", NPS, 10, None),
        ("cinq", CSAT, 5, None),
        ("4️⃣", CSAT, 4, None),
        ("🔟", NPS, 10, None),
        ("4 stars", CSAT, 4, None),
        ("9 - quick and friendly", NPS, 9, "quick and friendly"),
        ("3, slow answers", CSAT, 3, "slow answers"),
        ("10/10 great bot", NPS, 10, "great bot"),
    ],
)
def test_typed_answers_read(
    text: str, scale: tuple[int, int], score: int, comment: str | None
) -> None:
    answer = parse_answer(text, None, scale)
    assert answer is not None
    assert answer.score == score
    assert answer.comment == comment


@pytest.mark.parametrize(
    ("text", "scale"),
    [
        ("6", CSAT),
        ("11", NPS),
        ("10/10", CSAT),
        ("8/10", CSAT),
        ("4/5", NPS),
        ("4.5", CSAT),
        ("-1", NPS),
        ("", CSAT),
        ("hello", CSAT),
        ("2 questions about my order", CSAT),
        ("one more thing", NPS),
        ("⭐⭐⭐⭐⭐⭐", CSAT),
        ("survey:1:6", CSAT),
        ("survey:x:1", CSAT),
    ],
)
def test_unclear_answers_rejected(text: str, scale: tuple[int, int]) -> None:
    assert parse_answer(text, None, scale) is None


def test_payload_wins_over_title() -> None:
    answer = parse_answer("⭐⭐", score_payload(12, 5), CSAT)
    assert answer is not None
    assert (answer.score, answer.survey_id) == (5, 12)


def test_range_payload_and_title() -> None:
    by_payload = parse_answer("9-10", range_payload(3, 9, 10), NPS)
    by_title = parse_answer("7 – 8", None, NPS)
    assert by_payload is not None and by_payload.score_range == (9, 10)
    assert by_payload.survey_id == 3
    assert by_title is not None and by_title.score_range == (7, 8)


def _request(kind: str, channel: str, purpose: str = "prompt", **extra: Any) -> RenderRequest:
    config = parse_config(
        {
            "surveys": {
                "s": {
                    "kind": kind,
                    "channels": [channel],
                    "texts": {
                        "en": {
                            "prompt": "Rate us",
                            "reask": "Again?",
                            "follow_up": "Why?",
                            "list_button": "Pick a score",
                            "step2_prompt": "Exactly?",
                        }
                    },
                }
            }
        }
    )
    return RenderRequest(
        survey_id=41,
        kind=kind,
        channel=channel,
        user_id="u1",
        conversation_id="c1",
        purpose=purpose,
        texts=config.surveys["s"].texts_for("en"),
        **extra,
    )


def test_web_buttons_for_each_score() -> None:
    csat = render(_request("csat", "web"))
    nps = render(_request("nps", "web"))
    assert [reply.title for reply in csat.quick_replies] == [
        "⭐",
        "⭐⭐",
        "⭐⭐⭐",
        "⭐⭐⭐⭐",
        "⭐⭐⭐⭐⭐",
    ]
    assert [reply.title for reply in nps.quick_replies] == [str(n) for n in range(11)]
    assert nps.quick_replies[7].payload == "survey:41:7"
    assert csat.kind == "survey_prompt"
    assert csat.meta == {"survey_id": 41, "purpose": "prompt", "conversation_id": "c1"}


def test_messenger_quick_replies_within_limits() -> None:
    for kind, count in (("csat", 5), ("nps", 11)):
        message = render(_request(kind, "messenger"))
        body = messenger_request(message, "RESPONSE", None)
        replies = body["message"]["quick_replies"]
        assert len(replies) == count <= 13
        assert all(len(reply["title"]) <= 20 for reply in replies)
        assert all(len(reply["payload"]) <= 1000 for reply in replies)


def test_whatsapp_csat_list() -> None:
    body = whatsapp_request(render(_request("csat", "whatsapp")))
    interactive = body["interactive"]
    rows = interactive["action"]["sections"][0]["rows"]
    assert interactive["type"] == "list"
    assert interactive["action"]["button"] == "Pick a score"
    assert [row["id"] for row in rows] == [f"survey:41:{n}" for n in range(1, 6)]
    assert all(len(row["title"]) <= 24 for row in rows)


def test_whatsapp_nps_two_steps() -> None:
    first = whatsapp_request(render(_request("nps", "whatsapp")))
    buttons = first["interactive"]["action"]["buttons"]
    assert first["interactive"]["type"] == "button"
    assert [b["reply"]["title"] for b in buttons] == ["0-6", "7-8", "9-10"]
    assert [b["reply"]["id"] for b in buttons] == [
        "survey:41:range:0-6",
        "survey:41:range:7-8",
        "survey:41:range:9-10",
    ]
    for low, high in ((0, 6), (7, 8), (9, 10)):
        second = whatsapp_request(
            render(_request("nps", "whatsapp", "step2", score_range=(low, high)))
        )
        rows = second["interactive"]["action"]["sections"][0]["rows"]
        assert second["interactive"]["type"] == "list"
        assert second["interactive"]["body"]["text"] == "Exactly?"
        assert [row["title"] for row in rows] == [str(n) for n in range(low, high + 1)]
        assert len(rows) <= 10


def test_follow_up_is_plain_text() -> None:
    message = render(_request("csat", "whatsapp", "follow_up"))
    assert message.text == "Why?"
    assert not message.quick_replies
    assert not message.list_rows
    assert whatsapp_request(message)["type"] == "text"
