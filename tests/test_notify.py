"""Notifications: payloads received by a local HTTP server, a dead endpoint costs one warning,
secrets stay out of the run directory and the log."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_config

from kiln import Callback, Trainer
from kiln.callbacks.notify import Notification, NotifyCallback, build_senders
from kiln.config import ConfigError, NotifyConfig
from kiln.config.tracking import DiscordSender, SlackSender, TwilioSender, WebhookSender
from kiln.errors import DataError

SECRETS = {
    "T_DISCORD": "/discord/SECRET-discord-7f3a",
    "T_SLACK": "/slack/SECRET-slack-19bc",
    "T_HOOK": "/hook/SECRET-hook-5d2e",
    "T_HOOK_TOKEN": "SECRET-bearer-8c41",
    "T_SID": "ACSECRETsid0042",
    "T_AUTH": "SECRET-auth-77aa",
    "T_FROM": "+15550001111",
    "T_TO": "+15559998888",
}


class _Server:
    """A local HTTP server that records every POST: (path, headers, body)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append((self.path, dict(self.headers), body))
                self.send_response(204 if "discord" in self.path else 200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                """Keep the server's per-request lines out of the test output."""

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def posts(self, prefix: str) -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for p, h, b in self.requests if p.startswith(prefix)]


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(monkeypatch: pytest.MonkeyPatch, base: str) -> None:
    for name, value in SECRETS.items():
        url_like = name in ("T_DISCORD", "T_SLACK", "T_HOOK")
        monkeypatch.setenv(name, base + value if url_like else value)


SENDERS = [
    {"kind": "discord", "url_env": "T_DISCORD"},
    {"kind": "slack", "url_env": "T_SLACK"},
    {"kind": "webhook", "url_env": "T_HOOK", "token_env": "T_HOOK_TOKEN"},
    {
        "kind": "twilio",
        "account_sid_env": "T_SID",
        "auth_token_env": "T_AUTH",
        "from_env": "T_FROM",
        "to_env": "T_TO",
    },
]


class _Boom(Callback):
    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step == 3:
            raise RuntimeError("boom: the GPU caught fire\nsecond line")


class _EarlyStop(Callback):
    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step == 6:
            trainer.request_stop("early_stop: val_loss did not improve for 2 validations")


def _hook_events(server: _Server) -> list[dict[str, Any]]:
    return [json.loads(body) for _, body in server.posts("/hook/")]


def _scan_for_secrets(root: Path, values: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {v}" for v in values if v.encode() in data]
    return found


def test_all_senders_deliver_the_right_events_and_no_secret_is_written(
    tmp_path: Path,
    recipe_files,
    server: _Server,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _env(monkeypatch, server.url)
    senders = [*SENDERS[:3], {**SENDERS[3], "api_url": server.url}]
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        eval={"every_steps": 5},
        checkpoint={"every_steps": 10},  # checkpoints hold callback state: scanned below too
        log={"loggers": ["tensorboard"]},
        notify={
            "senders": senders,
            "events": ["start", "end", "failure", "best", "early_stop"],
            "every_steps": 10,
        },
    )
    with caplog.at_level(logging.DEBUG, logger="kiln"):
        result = Trainer(cfg).fit()

    events = _hook_events(server)
    records = map(json.loads, (cfg.run_dir / "metrics.jsonl").read_text().splitlines())
    val_losses = [(r["step"], r["val_loss"]) for r in records if r["split"] == "val"]
    # best: each validation that beat every earlier one (the first sets the bar).
    improved = [
        step
        for i, (step, v) in enumerate(val_losses)
        if i and v < min(x for _, x in val_losses[:i])
    ]
    # In loop order: progress fires at the end of its step, before that step's validation.
    expected = [("start", 0)]
    for step in (5, 10, 15, 20):
        expected += [("progress", step)] if step % 10 == 0 else []
        expected += [("best", step)] if step in improved else []
    assert [(e["event"], e["step"]) for e in events] == [*expected, ("end", 20)]
    assert len(improved) >= 2  # the tiny model does learn: the test exercises the event
    end = events[-1]
    assert end["run"] == "tiny"
    assert end["total_steps"] == 20
    assert end["metrics"]["val_loss"] == pytest.approx(result.summary["final_val"]["val_loss"])
    assert end["metrics"]["best_val_loss"] == pytest.approx(result.best_metric)
    assert str(result.final_dir) in end["message"]
    best = next(e for e in events if e["event"] == "best")
    assert best["metrics"]["best_val_loss"] == pytest.approx(dict(val_losses)[best["step"]])

    # Every sender got the same sequence, in its own format.
    for headers, _ in server.posts("/hook/"):
        assert headers["Authorization"] == f"Bearer {SECRETS['T_HOOK_TOKEN']}"
    discord = [json.loads(b) for _, b in server.posts("/discord/")]
    slack = [json.loads(b) for _, b in server.posts("/slack/")]
    assert [d["content"] for d in discord] == [e["message"] for e in events]
    assert [s["text"] for s in slack] == [e["message"] for e in events]
    sms = server.posts(f"/2010-04-01/Accounts/{SECRETS['T_SID']}/Messages.json")
    assert len(sms) == len(events)
    headers, body = sms[0]
    form = urllib.parse.parse_qs(body.decode())
    assert form["From"] == [SECRETS["T_FROM"]]
    assert form["To"] == [SECRETS["T_TO"]]
    assert form["Body"] == [events[0]["message"]]
    auth = base64.b64decode(headers["Authorization"].removeprefix("Basic ")).decode()
    assert auth == f"{SECRETS['T_SID']}:{SECRETS['T_AUTH']}"

    # Secrets: nowhere in the run directory (config.yaml names only the variables) or the log.
    config_text = (cfg.run_dir / "config.yaml").read_text()
    assert "url_env: T_DISCORD" in config_text
    assert _scan_for_secrets(cfg.run_dir, list(SECRETS.values())) == []
    assert not any(v in caplog.text for v in SECRETS.values())


def test_failure_notification_carries_the_error_line(
    tmp_path: Path, recipe_files, server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    _env(monkeypatch, server.url)
    cfg = tiny_config(tmp_path, *recipe_files, notify={"senders": [SENDERS[2]]})
    with pytest.raises(RuntimeError, match="boom"):
        Trainer(cfg, callbacks=[_Boom()]).fit()
    events = _hook_events(server)
    assert [e["event"] for e in events] == ["start", "failure"]
    failure = events[1]
    assert failure["error"] == "RuntimeError: boom: the GPU caught fire"
    assert failure["step"] == 3
    assert failure["message"] == (
        "kiln: run 'tiny' failed at step 3: RuntimeError: boom: the GPU caught fire"
    )


def test_a_failure_during_setup_is_notified_too(
    tmp_path: Path, server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    _env(monkeypatch, server.url)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "Title: Rice"}\n{"text": 5}\n')
    cfg = tiny_config(tmp_path, bad, None, notify={"senders": [SENDERS[2]]})
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'text' must be a string"):
        Trainer(cfg).fit()
    events = _hook_events(server)
    assert [e["event"] for e in events] == ["failure"]  # it never started
    assert "bad.jsonl:2: field 'text' must be a string" in events[0]["error"]
    assert events[0]["step"] == 0


def test_early_stop_is_reported_instead_of_end(
    tmp_path: Path, recipe_files, server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    _env(monkeypatch, server.url)
    cfg = tiny_config(
        tmp_path, *recipe_files, log={"plots": False}, notify={"senders": [SENDERS[2]]}
    )
    Trainer(cfg, callbacks=[_EarlyStop()]).fit()
    events = _hook_events(server)
    assert [e["event"] for e in events] == ["start", "early_stop"]
    assert events[1]["step"] == 6
    assert "early_stop: val_loss did not improve" in events[1]["message"]
    # Subscribed to end only: the early stop still ends the run with an end notification.
    server.requests.clear()
    cfg = tiny_config(
        tmp_path / "b",
        *recipe_files,
        train={"max_steps": 8},
        log={"plots": False},
        notify={"senders": [SENDERS[2]], "events": ["end"]},
    )
    Trainer(cfg, callbacks=[_EarlyStop()]).fit()
    assert [e["event"] for e in _hook_events(server)] == ["end"]


def test_down_endpoint_costs_one_warning_and_training_finishes(
    tmp_path: Path, recipe_files, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _env(monkeypatch, f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 10},
        log={"plots": False},
        notify={"senders": [SENDERS[2]], "every_steps": 5, "retries": 1, "timeout_s": 2},
    )
    with caplog.at_level(logging.WARNING, logger="kiln"):
        result = Trainer(cfg).fit()
    assert result.final_dir is not None
    assert result.summary["steps"] == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("notify: webhook: could not send the start notification")
    assert not any(v in caplog.text for v in SECRETS.values())


class _Stuck:
    """A sender that hangs until released; records which thread called it."""

    name = "stuck"
    secrets: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.release = threading.Event()
        self.threads: set[int] = set()

    def send(self, note: Notification, timeout: float) -> None:
        self.threads.add(threading.get_ident())
        self.release.wait(30)


def test_a_hanging_endpoint_never_holds_up_training(
    tmp_path: Path, recipe_files, caplog: pytest.LogCaptureFixture
) -> None:
    stuck = _Stuck()
    notify = NotifyConfig(
        senders=[WebhookSender(kind="webhook")], every_steps=1, flush_timeout_s=0.2
    )
    cfg = tiny_config(tmp_path, *recipe_files, train={"max_steps": 6}, log={"plots": False})
    try:
        with caplog.at_level(logging.WARNING, logger="kiln"):
            result = Trainer(cfg, callbacks=[NotifyCallback(notify, senders=[stuck])]).fit()
    finally:
        stuck.release.set()
    assert result.summary["steps"] == 6
    assert stuck.threads
    assert threading.get_ident() not in stuck.threads
    assert [r.getMessage() for r in caplog.records] == [
        "notify: notifications still unsent after 0.2 s (notify.flush_timeout_s); "
        "not waiting for them"
    ]


def test_missing_environment_variable_turns_the_sender_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = NotifyConfig(
        senders=[
            SlackSender(kind="slack", url_env="T_SLACK"),
            TwilioSender(kind="twilio", auth_token_env="T_AUTH"),
            DiscordSender(kind="discord", url_env="T_DISCORD"),
        ]
    )
    environ = {"T_SLACK": "http://x/slack", "TWILIO_ACCOUNT_SID": "AC1", "T_AUTH": "tok"}
    with caplog.at_level(logging.WARNING, logger="kiln"):
        senders = build_senders(cfg, environ)
    assert [s.name for s in senders] == ["slack"]
    assert [r.getMessage() for r in caplog.records] == [
        "notify.senders.1 (twilio): environment variable TWILIO_FROM_NUMBER, TWILIO_TO_NUMBER "
        "is not set; this sender is off",
        "notify.senders.2 (discord): environment variable T_DISCORD is not set; this sender is off",
    ]
    assert "tok" not in caplog.text
    assert "AC1" not in caplog.text


def test_config_names_variables_never_secrets(tmp_path: Path, recipe_files) -> None:
    url = "https://hooks.slack.com/services/T000/B000/SECRETxyz"
    with pytest.raises(ConfigError) as info:
        tiny_config(
            tmp_path, *recipe_files, notify={"senders": [{"kind": "slack", "url_env": url}]}
        )
    (problem,) = info.value.problems
    assert problem.startswith("notify.senders.0.slack.url_env: must be the name of an environment")
    assert "SECRET" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        tiny_config(tmp_path, *recipe_files, notify={"senders": [{"kind": "pager"}]})
    assert info.value.problems[0].startswith("notify.senders.0:")
    with pytest.raises(ConfigError) as info:
        tiny_config(tmp_path, *recipe_files, notify={"events": ["start", "lunch"]})
    assert info.value.problems[0].startswith("notify.events.1:")


def test_sender_sections_are_documented() -> None:
    for section in (DiscordSender, SlackSender, WebhookSender, TwilioSender):
        for name, info in section.model_fields.items():
            assert info.description, f"{section.__name__}.{name}"
