"""Notifications: payloads received by a local HTTP server, a dead endpoint costs one warning,
a hanging one delays no other sender, secrets stay out of the run directory and the log."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import tiny_config

from kiln import Callback, StopRequest, Trainer
from kiln.callbacks.notify import NOTIFIERS, Notification, NotifyCallback, build_senders
from kiln.cli import main
from kiln.config import ConfigError, NotifyConfig
from kiln.config.tracking import DiscordSender, SlackSender, TwilioSender, WebhookSender
from kiln.engine.control import Control, RunView
from kiln.engine.state import TrainState
from kiln.errors import DataError, KilnError
from kiln.rank import RankContext

ROOT = Path(__file__).resolve().parents[1]

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
    """A local HTTP server that records every POST: (path, headers, body, arrival time).

    `hang=True`: it accepts the request and then sleeps until `close()` before answering,
    like an endpoint that took the connection and went silent.
    """

    def __init__(self, hang: bool = False) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes, datetime]] = []
        self.release = threading.Event()
        received, release = self.requests, self.release

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                arrived = datetime.now(timezone.utc)
                received.append((self.path, dict(self.headers), body, arrived))
                if hang:
                    release.wait(60)
                self.send_response(204 if "discord" in self.path else 200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                """Keep the server's per-request lines out of the test output."""

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def posts(self, prefix: str) -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for p, h, b, _ in self.requests if p.startswith(prefix)]

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture
def make_server() -> Iterator[Callable[..., _Server]]:
    """More servers, healthy or hanging (`make_server(hang=True)`), closed after the test."""
    made: list[_Server] = []

    def make(hang: bool = False) -> _Server:
        made.append(_Server(hang))
        return made[-1]

    yield make
    for srv in made:
        srv.close()


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
    def on_step_end(self, run: RunView) -> None:
        if run.state.step == 3:
            raise RuntimeError("boom: the GPU caught fire\nsecond line")


class _EarlyStop(Callback):
    def on_step_end(self, run: RunView) -> None:
        if run.state.step == 6:
            reason = "val_loss did not improve for 2 validations"
            run.control.request_stop(StopRequest("early_stop", reason))


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
        result = Trainer.from_config(cfg).fit()

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
        Trainer.from_config(cfg, callbacks=[_Boom()]).fit()
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
        Trainer.from_config(cfg).fit()
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
    Trainer.from_config(cfg, callbacks=[_EarlyStop()]).fit()
    events = _hook_events(server)
    assert [e["event"] for e in events] == ["start", "early_stop"]
    assert events[1]["step"] == 6
    assert events[1]["message"].startswith("kiln: run 'tiny' stopped early at step 6/20 after ")
    assert ": val_loss did not improve for 2 validations" in events[1]["message"]
    assert "final model" in events[1]["message"]  # an early stop still ends the run
    # Subscribed to end only: the early stop still ends the run with an end notification.
    server.requests.clear()
    cfg = tiny_config(
        tmp_path / "b",
        *recipe_files,
        train={"max_steps": 8},
        log={"plots": False},
        notify={"senders": [SENDERS[2]], "events": ["end"]},
    )
    Trainer.from_config(cfg, callbacks=[_EarlyStop()]).fit()
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
        result = Trainer.from_config(cfg).fit()
    assert result.final_dir is not None
    assert result.summary["steps"] == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("notify: webhook failed to send the start notification")
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
        "notify: stuck: still busy after 0.2 s (notify.flush_timeout_s); not waiting for it"
    ]


def _webhooks(monkeypatch: pytest.MonkeyPatch, **urls: str) -> list[dict[str, str]]:
    """One webhook sender per keyword: variable name -> URL (set in the environment)."""
    for name, url in urls.items():
        monkeypatch.setenv(name, url)
    return [{"kind": "webhook", "url_env": name} for name in urls]


class _Clock(Callback):
    """Records when on_train_end reaches it (placed before and after the callback timed)."""

    at: float | None = None

    def on_train_end(self, run: RunView) -> None:
        self.at = time.monotonic()


def test_a_hanging_sender_does_not_delay_a_healthy_one(
    tmp_path: Path,
    recipe_files,
    make_server: Callable[..., _Server],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    healthy, stuck = make_server(), make_server(hang=True)
    # The hanging sender first: with a shared queue it would hold every note behind it.
    senders = _webhooks(monkeypatch, T_STUCK=f"{stuck.url}/hook/stuck", T_OK=f"{healthy.url}/ok")
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 16},
        notify={
            "senders": senders,
            "every_steps": 1,
            "timeout_s": 60,  # the stuck request stays stuck for the whole run
            "retries": 0,
            "flush_timeout_s": 1,
        },
    )
    trainer = Trainer.from_config(cfg)
    with caplog.at_level(logging.WARNING, logger="kiln"):
        trainer.fit()

    expected = [("start", 0), *[("progress", s) for s in range(1, 17)], ("end", 16)]
    received = [(json.loads(body), arrived) for _, _, body, arrived in healthy.requests]
    assert [(n["event"], n["step"]) for n, _ in received] == expected
    # Promptly: each note reached the healthy endpoint soon after it was emitted.
    latency = [
        (arrived - datetime.fromisoformat(n["time"])).total_seconds() for n, arrived in received
    ]
    assert max(latency) < 2.0, latency
    assert len(stuck.requests) == 1  # the start note, still unanswered
    notify = next(cb for cb in trainer.callbacks if isinstance(cb, NotifyCallback))
    assert [(n.event, n.step) for n in notify.sent] == expected
    assert [r.getMessage() for r in caplog.records] == [
        "notify: webhook: still busy after 1 s (notify.flush_timeout_s); not waiting for it"
    ]


def test_a_closed_port_sender_does_not_cost_a_healthy_one_its_end_note(
    tmp_path: Path,
    recipe_files,
    server: _Server,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed = f"http://127.0.0.1:{_free_port()}/hook/SECRET-closed-3e9f"  # nothing listens
    senders = _webhooks(monkeypatch, T_CLOSED=closed, T_OK=f"{server.url}/ok")
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 10},
        # Each note to the closed port costs 0.5 + 1 + 2 s of backoff: 14 s for the four.
        # The flush gives the healthy sender time even on a loaded machine; the closed one
        # still needs far longer than that and is abandoned.
        notify={"senders": senders, "every_steps": 5, "retries": 3, "flush_timeout_s": 5},
    )
    with caplog.at_level(logging.WARNING, logger="kiln"):
        Trainer.from_config(cfg).fit()
    events = [json.loads(body) for _, body in server.posts("/ok")]
    assert [(e["event"], e["step"]) for e in events] == [
        ("start", 0),
        ("progress", 5),
        ("progress", 10),
        ("end", 10),
    ]
    warnings = [r.getMessage() for r in caplog.records]
    assert any(
        w.startswith("notify: webhook failed to send the start notification") for w in warnings
    ), warnings
    assert "SECRET-closed" not in caplog.text


def test_the_flush_waits_flush_timeout_s_in_total_not_per_sender(
    tmp_path: Path,
    recipe_files,
    make_server: Callable[..., _Server],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stuck = [make_server(hang=True) for _ in range(3)]
    healthy = make_server()
    urls = {f"T_STUCK{i}": f"{srv.url}/hook" for i, srv in enumerate(stuck)}
    senders = _webhooks(monkeypatch, **urls, T_OK=f"{healthy.url}/ok")
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 4},
        notify={"senders": senders, "timeout_s": 60, "retries": 0, "flush_timeout_s": 1},
    )
    before, after = _Clock(), _Clock()
    Trainer(cfg, callbacks=[before, NotifyCallback(cfg.notify), after]).fit()
    assert before.at is not None
    assert after.at is not None
    took = after.at - before.at  # the end note and the flush
    assert 0.9 < took < 2.0, f"flush took {took:.2f} s with flush_timeout_s=1"
    assert [json.loads(b)["event"] for _, b in healthy.posts("/ok")] == ["start", "end"]
    assert [len(srv.requests) for srv in stuck] == [1, 1, 1]


def test_a_warning_never_quotes_part_of_a_secret_url(
    tmp_path: Path,
    recipe_files,
    server: _Server,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # http.client rejects the space and its error quotes only the URL's path: the secret part.
    senders = _webhooks(monkeypatch, T_BAD=f"{server.url}/hook/SECRET-path-61d0 x")
    cfg = tiny_config(
        tmp_path, *recipe_files, train={"max_steps": 4}, notify={"senders": senders, "retries": 0}
    )
    with caplog.at_level(logging.DEBUG, logger="kiln"):
        Trainer.from_config(cfg).fit()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "URL can't contain control characters" in warnings[0]
    assert "SECRET" not in caplog.text  # the warning and the debug line for the end note
    assert server.requests == []


class _Inbox:
    """A sender that keeps what it is sent; fails its first `fail_first` sends."""

    name = "inbox"
    secrets: tuple[str, ...] = ("SECRET-inbox-0a1b",)

    def __init__(self, fail_first: int = 0) -> None:
        self.notes: list[Notification] = []
        self.fail_first = fail_first
        self.calls = 0

    def send(self, note: Notification, timeout: float) -> None:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise ConnectionError(f"refused by https://x/SECRET-inbox-0a1b (call {self.calls})")
        self.notes.append(note)


def _view(tmp_path: Path, stop: StopRequest | None = None) -> RunView:
    """A run's view at step 7 of 20 as the loop hands it to callbacks, after `stop`."""
    control = Control()
    if stop is not None:
        control.request_stop(stop)
    cfg: Any = SimpleNamespace(name="t", checkpoint=SimpleNamespace(metric="val_loss"))
    state = TrainState(step=7, total_steps=20, last_train_loss=1.25)
    return RunView(cfg, state, tmp_path, control, RankContext())


@pytest.mark.parametrize(
    ("stop", "final", "event", "text"),
    [
        (None, True, "end", "kiln: run 't' finished 7 steps in "),
        (StopRequest("early_stop", "no better"), True, "early_stop", "stopped early at step 7/20"),
        (StopRequest("signal", "SIGTERM", resumable=True), False, "end", "paused at step 7/20"),
        (StopRequest("pruned", "trial pruned", write_final=False), False, "end", "stopped at"),
        (StopRequest("diverged", "diverged at step 6: a nan loss"), False, "diverged", "at step"),
    ],
)
def test_the_end_note_says_how_the_run_ended(
    tmp_path: Path, stop: StopRequest | None, final: bool, event: str, text: str
) -> None:
    inbox = _Inbox()
    events = ["start", "end", "failure", "early_stop", "diverged"]
    callback = NotifyCallback(NotifyConfig(events=events), senders=[inbox])
    run = _view(tmp_path, stop)
    callback.on_train_begin(run)
    if final:
        callback.on_checkpoint(run, tmp_path / "final", "final")
    callback.on_checkpoint(run, tmp_path / "checkpoints" / "step-7", "pause")  # not a model
    callback.on_train_end(run)
    start, end = inbox.notes
    assert start.event == "start"
    assert end.event == event
    assert text in end.message
    assert end.metrics == {"train_loss": 1.25}
    assert ("final model: " in end.message) == final
    assert ("--resume" in end.message) == (stop is not None and stop.resumable)
    if stop is not None:
        assert stop.reason in end.message
    assert end.error == (stop.reason if event == "diverged" else None)  # type: ignore[union-attr]
    assert callback.sent == inbox.notes


def test_a_sender_keeps_trying_after_its_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The notifier side of the shared failure policy: one warning, not switched off."""
    inbox = _Inbox(fail_first=3)
    cfg = NotifyConfig(events=["start", "end", "failure"], retries=1, every_steps=1)
    callback = NotifyCallback(cfg, senders=[inbox])
    run = _view(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="kiln"):
        callback.on_train_begin(run)  # two attempts, both fail: the warning
        callback.on_step_end(run)  # fails, then goes through on the retry
        callback.on_exception(run, RuntimeError(""))
    assert [n.event for n in inbox.notes] == ["progress", "failure"]
    assert inbox.notes[1].error == "RuntimeError"  # no message: the type alone
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "notify: inbox failed to send the start notification after 2 attempts (ConnectionError: "
        "refused by https://x/*** (call 2)); training goes on (later failures not reported)"
    ]
    assert "SECRET" not in caplog.text


def test_senders_are_plug_ins_by_kind() -> None:
    made: list[dict[str, str]] = []

    def my_slack(spec: Any, secrets: Any) -> _Inbox:
        made.append(dict(secrets))
        return _Inbox()

    cfg = NotifyConfig(
        senders=[SlackSender(kind="slack", url_env="T_S"), TwilioSender(kind="twilio")]
    )
    environ = {
        "T_S": "https://x/s",
        **{f"TWILIO_{k}": f"v-{k}" for k in ("ACCOUNT_SID", "AUTH_TOKEN", "FROM_NUMBER")},
        "TWILIO_TO_NUMBER": "v-TO",
    }
    builtin = NOTIFIERS.pop("slack")
    try:
        NOTIFIERS.add("slack", my_slack)
        slack, twilio = build_senders(cfg, environ)
        assert isinstance(slack, _Inbox)
        assert made == [{"url": "https://x/s"}]  # secrets by field name, without _env
        assert twilio.secrets == ("v-ACCOUNT_SID", "v-AUTH_TOKEN", "v-FROM_NUMBER", "v-TO")
        NOTIFIERS.pop("slack")
        with pytest.raises(KilnError) as info:
            build_senders(cfg, environ)
        assert info.value.problems == [
            "notify.senders.0.kind: unknown notifier 'slack' (known: discord, twilio, webhook)"
        ]
    finally:
        NOTIFIERS.add("slack", builtin, replace=True)


def test_missing_environment_variable_is_an_error_naming_the_key_not_the_variable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = NotifyConfig(
        senders=[
            SlackSender(kind="slack", url_env="T_SLACK"),
            TwilioSender(kind="twilio", auth_token_env="T_AUTH"),
            # A name that may be a pasted secret: it must not be echoed either.
            WebhookSender(kind="webhook", url_env="F93062ABCDEF", token_env="T_TOKEN"),
        ]
    )
    environ = {
        "T_SLACK": "http://x/slack/SECRET-a1",
        "TWILIO_ACCOUNT_SID": "ACSECRET-b2",
        "T_AUTH": "SECRET-c3",
        "TWILIO_TO_NUMBER": "  ",  # blank counts as unset
        "T_TOKEN": "SECRET-d4",
    }
    with caplog.at_level(logging.DEBUG, logger="kiln"), pytest.raises(KilnError) as info:
        build_senders(cfg, environ)
    why = (
        "the environment variable named here is not set (or is empty); set it, or remove this "
        "sender"
    )
    assert info.value.problems == [
        f"notify.senders.1.from_env: {why}",
        f"notify.senders.1.to_env: {why}",
        f"notify.senders.2.url_env: {why}",
    ]
    text = str(info.value) + caplog.text
    for leaked in ["F93062ABCDEF", "T_SLACK", "TWILIO", "T_AUTH", "T_TOKEN", "SECRET", "x/slack"]:
        assert leaked not in text


def test_kiln_train_refuses_a_sender_whose_variable_is_unset_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("F93062ABCDEF", raising=False)
    out = tmp_path / "run"
    code = main(
        [
            "train",
            str(ROOT / "configs/quickstart.yaml"),
            f"output_dir={out}",
            "notify.senders=[{kind: webhook, url_env: F93062ABCDEF}]",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "kiln: error: notify.senders.0.url_env: the environment variable named here is not set "
        "(or is empty); set it, or remove this sender"
    ]
    assert "F93062ABCDEF" not in err
    assert not out.exists()  # refused before the run directory, data or model


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
