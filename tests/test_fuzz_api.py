"""The HTTP API against its own OpenAPI description, with schemathesis, in process.

Every operation of the app ``mount_chatmw`` builds gets generated valid and invalid
requests on a small SQLite or PostgreSQL store. No response may be a server error, and
every response must match the schema its operation declares.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from chatmw import events as ev
from chatmw.app import ChatmwMount, mount_chatmw
from chatmw.config import Settings
from chatmw.runtime import Runtime
from chatmw.security.keys import create_key

# Server-sent events never end, so a generated request to the live stream would not return.
EXCLUDED_PATHS = ("/metrics/live",)
EXAMPLES = {GenerationMode.POSITIVE: 15, GenerationMode.NEGATIVE: 10}
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def seed_events() -> list[ev.Event]:
    found: list[ev.Event] = []
    for number, channel in enumerate(["web", "messenger", "whatsapp"]):
        user = f"user-{number}"
        at = START + timedelta(hours=number)
        found.append(ev.Touch(channel=channel, occurred_at=at, key=f"touch-{number}",
                              user_id=user, source="newsletter", medium="email",
                              campaign="spring", ad_id=f"ad-{number}"))
        found.append(ev.Message(channel=channel, occurred_at=at, key=f"in-{number}", role="user",
                                user_id=user, text="What are your opening hours?",
                                conversation_id=f"conversation-{number}",
                                attributes={"plan": "pro"}))
        found.append(ev.Message(channel=channel, occurred_at=at + timedelta(seconds=2),
                                key=f"out-{number}", role="bot", user_id=user,
                                text="We open at 9.", conversation_id=f"conversation-{number}",
                                intent="opening_hours"))
    return found


@pytest.fixture
def mounted(database_url: str) -> Iterator[tuple[FastAPI, ChatmwMount, str]]:
    runtime = Runtime.from_settings(Settings(database_url=database_url, sentiment=False))
    app = FastAPI()
    mount = mount_chatmw(app, runtime, require_keys=False, manage_lifespan=False)
    asyncio.run(mount.start())
    runtime.writer.write(seed_events())
    key = create_key(runtime.engine, "admin").key
    yield app, mount, key
    asyncio.run(mount.stop())


def operation_ids(schema: Any) -> list[Any]:
    operations = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path not in EXCLUDED_PATHS:
            operations.append(operation)
    return operations


def check_operation(operation: Any, mode: GenerationMode, headers: dict[str, str]) -> None:
    @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run_cases(case: Any) -> None:
        case.call_and_validate(headers=headers,
                               checks=[not_a_server_error, response_schema_conformance])

    run_cases()


# Operations whose 422 body is {"detail": "text"}, while their OpenAPI description promises
# FastAPI's list of {"loc", "msg", "type"}.
KNOWN_GAPS = {
    ("POST", "/surveys/send"): GenerationMode.POSITIVE,
    ("PUT", "/surveys/config"): GenerationMode.POSITIVE,
}


def run_operations(app: FastAPI, key: str, gaps: bool) -> dict[str, list[str]]:
    """Fuzz every operation (only the known gaps when ``gaps``) and return the failures."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = operation_ids(schema)
    assert len(operations) > 20
    headers = {"Authorization": f"Bearer {key}"}

    failures = {}
    for operation in operations:
        for mode in EXAMPLES:
            known = KNOWN_GAPS.get((operation.method.upper(), operation.path)) == mode
            if known != gaps:
                continue
            try:
                check_operation(operation, mode, headers)
            except Unsatisfiable:
                continue  # no invalid request exists for an operation without parameters
            except BaseExceptionGroup as error:  # collected, so one run lists every failure
                label = f"{operation.method.upper()} {operation.path} ({mode.value})"
                failures[label] = [line for line in str(error).splitlines() if line.strip()][:6]
    return failures


def test_api_conforms_to_openapi(mounted: tuple[FastAPI, ChatmwMount, str]) -> None:
    app, _, key = mounted

    failures = run_operations(app, key, gaps=False)

    report = "\n".join(f"{label}: {' / '.join(lines)}" for label, lines in failures.items())
    assert not failures, report


@pytest.mark.xfail(strict=True, reason="the survey admin routes answer 422 with a string "
                   "detail, not the list of {loc, msg, type} their OpenAPI description declares")
def test_survey_admin_422_matches_schema(mounted: tuple[FastAPI, ChatmwMount, str]) -> None:
    app, _, key = mounted

    failures = run_operations(app, key, gaps=True)

    assert sorted(failures) == []
