"""Tokens stay secret: during pushes through the app to a loopback Hub (`tests.fixtures_hub`), successful and
failing, no token (nor any distinctive part of one) appears in logs, stdout/stderr, error messages, the
reports, the pushed files or anything the app leaves in gradio's cache.

The app runs in this process (`tests.fixtures_app`), so `caplog` (every logger lowered to DEBUG) and `capfd`
(file descriptors 1 and 2) see its logs, gradio's, uvicorn's, httpx's and huggingface_hub's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from tests.fixtures_app import EXAMPLE_LORA
from tests.fixtures_hub import NO_WRITE_TOKEN, READ_TOKEN, SPACE_OWNER_TOKEN, VISITOR, VISITOR_TOKEN

TOKENS = (VISITOR_TOKEN, NO_WRITE_TOKEN, READ_TOKEN, SPACE_OWNER_TOKEN)


# every 12-character stretch of every token: a token cut short or partly masked still leaks
FRAGMENTS = sorted({token[i : i + 12] for token in TOKENS for i in range(len(token) - 11)})


def _leaks(text: str | bytes) -> list[str]:
    """The stretches of tokens found in `text`."""
    data = text.encode() if isinstance(text, str) else text
    return [fragment for fragment in FRAGMENTS if fragment.encode() in data]


@pytest.fixture
def every_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """`caplog` receiving every record of every logger at DEBUG: library loggers that set their own level
    (huggingface_hub's is WARNING) are lowered, and those that do not propagate (uvicorn's) are made to."""
    caplog.set_level(logging.DEBUG)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):
            caplog.set_level(logging.DEBUG, logger=name)
            monkeypatch.setattr(logger, "propagate", True)
    return caplog


def test_no_token_appears_anywhere_during_pushes(app_url, app_module, hub_online, every_log, capfd):
    from gradio_client.exceptions import AppError

    visitor = Client(app_url, verbose=False, oauth_token=VISITOR_TOKEN)
    resized, report = visitor.predict(lora_file=handle_file(str(EXAMPLE_LORA)), rank=4, api_name="/resize")
    pushed = visitor.predict(resized_file=handle_file(resized), report=report, source="someone/style", api_name="/push")
    assert pushed["repo_id"] == f"{VISITOR}/style-rank4"

    failures = {}
    attempts = [
        (NO_WRITE_TOKEN, {}, "HTTP 403"),
        (READ_TOKEN, {}, "read-only"),
        (VISITOR_TOKEN, {"commit": 500}, "HTTP 500"),
        (VISITOR_TOKEN, {"create_repo": "drop"}, "network failure"),
    ]
    for token, fail, fragment in attempts:
        hub_online.fail.clear()
        hub_online.fail.update(fail)
        with pytest.raises(AppError) as refused:
            Client(app_url, verbose=False, oauth_token=token).predict(
                resized_file=handle_file(resized), report=report, repo_id="failing", api_name="/push"
            )
        failures[fragment] = str(refused.value)
        assert fragment in failures[fragment] and "\n" not in failures[fragment]
    hub_online.fail.clear()

    # the tokens did travel, to the Hub only: the search below is not vacuous
    assert {VISITOR_TOKEN, NO_WRITE_TOKEN, READ_TOKEN} <= hub_online.tokens_seen()
    logs = every_log.text + "".join(str(record.__dict__) for record in every_log.records)
    assert hub_online.url.split("//")[1] in logs  # the Hub requests were logged, and are searched
    output = capfd.readouterr()

    (commit,) = hub_online.commits
    searched = {
        "logs": logs,
        "stdout": output.out,
        "stderr": output.err,
        "errors": json.dumps(failures),
        "report": json.dumps(report),
        "push result": json.dumps(pushed),
        "commit message": commit.summary + commit.description,
        **{f"pushed {name}": data for name, data in commit.files.items()},
        **{
            f"cache {path.name}": path.read_bytes()
            for path in Path(app_module.demo.GRADIO_CACHE).rglob("*")
            if path.is_file()
        },
    }
    assert {"pushed README.md", "pushed resize-report.json"} <= set(searched)
    assert {where: found for where, text in searched.items() if (found := _leaks(text))} == {}
