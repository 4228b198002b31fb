"""Notifications about a run: Discord, Slack, any JSON webhook, SMS through Twilio.

Secrets (webhook URLs, tokens, phone numbers) are read from the environment variables the
config names, when the callback is built: a variable that is unset or empty is a `KilnError`
then, before any training work, naming the config key (never the variable or a value). They
are never written to the run directory or the log (warnings redact them).

Each sender has its own queue and background thread, and spends its own time budget there (a
timeout per request, retries with backoff): a slow, hanging or dead endpoint never holds up
training, nor another sender's notes. At the end of the run (or on a failure) all senders drain
in parallel for at most `notify.flush_timeout_s` in total; a sender still busy then is
abandoned: its daemon thread drops what is still queued and never holds up the process's exit.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kiln.callbacks.base import Callback
from kiln.callbacks.loggers.worker import Worker
from kiln.config.tracking import (
    DiscordSender,
    NotifyConfig,
    SlackSender,
    TwilioSender,
    WebhookSender,
)
from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.engine.trainer import Trainer

__all__ = [
    "DiscordWebhook",
    "JsonWebhook",
    "Notification",
    "NotifyCallback",
    "Sender",
    "SlackWebhook",
    "TwilioSMS",
    "build_senders",
]

log = logging.getLogger("kiln")

_USER_AGENT = "kiln-notify/1"


@dataclass(frozen=True)
class Notification:
    """One event of a run, as sent (the generic webhook receives exactly `to_json()`)."""

    event: str
    """start | end | failure | best | early_stop | progress."""
    run: str
    message: str
    step: int
    total_steps: int
    run_dir: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    """The error line, for failure."""
    time: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    def to_json(self) -> dict[str, Any]:
        """The JSON object the generic webhook POSTs."""
        return {"source": "kiln", **asdict(self)}


class Sender(Protocol):
    """Delivers a notification; raises on failure (the callback retries)."""

    name: str
    secrets: tuple[str, ...]
    """Values redacted from any message that could reach a log."""

    def send(self, note: Notification, timeout: float) -> None:
        """Deliver `note`, waiting at most `timeout` seconds for the endpoint."""


def _post(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> None:
    """POST and read the reply; HTTP errors (4xx, 5xx) raise."""
    request = urllib.request.Request(
        url, data=body, headers={"User-Agent": _USER_AGENT, **headers}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        reply.read()


def _post_json(
    url: str, payload: Any, timeout: float, headers: Mapping[str, str] | None = None
) -> None:
    body = json.dumps(payload).encode()
    _post(url, body, {"Content-Type": "application/json", **(headers or {})}, timeout)


@dataclass
class DiscordWebhook:
    """A Discord channel webhook (the message as `content`, at most 2000 characters)."""

    url: str
    name: str = "discord"

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.url,)

    def send(self, note: Notification, timeout: float) -> None:
        _post_json(self.url, {"content": note.message[:2000], "username": "kiln"}, timeout)


@dataclass
class SlackWebhook:
    """A Slack incoming webhook (the message as `text`)."""

    url: str
    name: str = "slack"

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.url,)

    def send(self, note: Notification, timeout: float) -> None:
        _post_json(self.url, {"text": note.message}, timeout)


@dataclass
class JsonWebhook:
    """Any endpoint: POSTs `Notification.to_json()`, with an optional bearer token."""

    url: str
    token: str | None = None
    name: str = "webhook"

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.url,) if self.token is None else (self.url, self.token)

    def send(self, note: Notification, timeout: float) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        _post_json(self.url, note.to_json(), timeout, headers)


@dataclass
class TwilioSMS:
    """An SMS through Twilio's Messages API (form POST, HTTP basic auth)."""

    account_sid: str
    auth_token: str
    from_number: str
    to_number: str
    api_url: str = "https://api.twilio.com"
    name: str = "twilio"

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.account_sid, self.auth_token, self.from_number, self.to_number)

    def send(self, note: Notification, timeout: float) -> None:
        sid = urllib.parse.quote(self.account_sid, safe="")
        url = f"{self.api_url.rstrip('/')}/2010-04-01/Accounts/{sid}/Messages.json"
        form = {"From": self.from_number, "To": self.to_number, "Body": note.message[:1600]}
        auth = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        headers = {
            "Authorization": f"Basic {auth}",
            "Content-Type": "application/x-www-form-urlencoded",
        }
        _post(url, urllib.parse.urlencode(form).encode(), headers, timeout)


_SenderSpec = DiscordSender | SlackSender | WebhookSender | TwilioSender


def _env_keys(spec: _SenderSpec) -> list[str]:
    """The keys of `spec` that name an environment variable, in the sender's argument order."""
    if isinstance(spec, TwilioSender):
        return ["account_sid_env", "auth_token_env", "from_env", "to_env"]
    if isinstance(spec, WebhookSender) and spec.token_env:
        return ["url_env", "token_env"]
    return ["url_env"]


def _make_sender(spec: _SenderSpec, values: list[str]) -> Sender:
    if isinstance(spec, DiscordSender):
        return DiscordWebhook(values[0])
    if isinstance(spec, SlackSender):
        return SlackWebhook(values[0])
    if isinstance(spec, WebhookSender):
        return JsonWebhook(values[0], values[1] if spec.token_env else None)
    return TwilioSMS(*values, api_url=spec.api_url)


def build_senders(cfg: NotifyConfig, environ: Mapping[str, str] | None = None) -> list[Sender]:
    """The senders of `notify.senders`, with their secrets read from the environment.

    Raises:
        KilnError: a variable a sender names is unset or empty (one line per such key). A line
            names the config key (`notify.senders.0.url_env`), never the variable or a value:
            a user may have pasted a secret where the variable's name goes.
    """
    env = os.environ if environ is None else environ
    problems: list[str] = []
    specs: list[tuple[_SenderSpec, list[str]]] = []
    for i, spec in enumerate(cfg.senders):
        keys = _env_keys(spec)
        # Stray whitespace (a .env file with CRLF line ends) would only make every request
        # fail later, with an error message that may quote the secret.
        values = [env.get(getattr(spec, key), "").strip() for key in keys]
        problems += [
            f"notify.senders.{i}.{key}: the environment variable named here is not set (or is "
            "empty); set it, or remove this sender"
            for key, value in zip(keys, values, strict=True)
            if not value
        ]
        specs.append((spec, values))
    if problems:
        raise KilnError(problems)
    return [_make_sender(spec, values) for spec, values in specs]


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    """`text` with each secret, and each part of one that an error may quote, as ***."""
    forms: set[str] = set()
    for secret in secrets:
        if not secret:
            continue
        forms |= {secret, urllib.parse.quote(secret, safe="")}
        # http.client quotes only the request path when it rejects a URL ("URL can't contain
        # control characters. '/services/T0/B0/XYZ ...'"): the secret part of a webhook URL.
        url = urllib.parse.urlsplit(secret)
        if url.scheme and url.netloc:
            forms |= {url.path, url.query, url.password or ""}
    for form in sorted((f for f in forms if len(f) > 1), key=len, reverse=True):
        text = text.replace(form, "***")
    return text


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class _Channel:
    """One sender's own queue, thread and time budget (timeout per request, retries with
    backoff), so a sender that hangs or keeps failing delays only its own notes."""

    def __init__(
        self, sender: Sender, cfg: NotifyConfig, on_sent: Callable[[int, Notification], None]
    ) -> None:
        self.sender = sender
        self.cfg = cfg
        self._on_sent = on_sent
        self.worker = Worker(f"kiln-notify-{sender.name}", on_error=self._on_bug)
        self._warned = False  # touched only by this channel's thread
        # Set when the flush stops waiting for this sender: its thread then drops what is
        # still queued instead of sending stale notes (and warnings) long after the run.
        self._abandoned = threading.Event()

    def submit(self, seq: int, note: Notification) -> None:
        self.worker.submit(self._deliver, seq, note)

    def abandon(self) -> None:
        self._abandoned.set()

    def _deliver(self, seq: int, note: Notification) -> None:
        if self._abandoned.is_set():
            return
        error: Exception | None = None
        for attempt in range(self.cfg.retries + 1):
            # Backoff 0.5 s, 1 s, 2 s, ... (at most 5 s); cut short when abandoned.
            if attempt and self._abandoned.wait(min(0.5 * 2 ** (attempt - 1), 5.0)):
                break
            try:
                self.sender.send(note, self.cfg.timeout_s)
            except Exception as exc:
                error = exc
                continue
            self._on_sent(seq, note)
            return
        text = _first_line(error) if error else "unknown error"
        if self._warned or self._abandoned.is_set():
            self._log(logging.DEBUG, f"{note.event} not sent ({text})")
            return
        self._warned = True
        self._log(
            logging.WARNING,
            f"could not send the {note.event} notification after {self.cfg.retries + 1} "
            f"attempts ({text}); training goes on (later failures of this sender are not "
            "reported)",
        )

    def _on_bug(self, exc: BaseException) -> None:
        # Not a failed request (those are handled above): the Worker's own report would
        # print the exception unredacted.
        self._log(logging.DEBUG, f"delivery failed: {_first_line(exc)}")

    def _log(self, level: int, message: str) -> None:
        # Redact the whole line: an error text can quote a URL, and a sender picks its own name.
        log.log(level, "%s", _redact(f"notify: {self.sender.name}: {message}", self.secrets))

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(self.sender.secrets)


class NotifyCallback(Callback):
    """Sends the events of `notify.events` (and progress every `notify.every_steps`) to every
    sender. Delivery is off the training thread, one thread per sender; a sender that keeps
    failing gets one warning.
    """

    def __init__(
        self,
        cfg: NotifyConfig,
        senders: list[Sender] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.senders = build_senders(cfg, environ) if senders is None else list(senders)
        self._channels = self._open_channels()
        self._seq = itertools.count()
        self._lock = threading.Lock()  # the channels' threads record deliveries concurrently
        self._sent: dict[int, Notification] = {}
        self._best: float | None = None
        self._final: Path | None = None
        self._start = time.monotonic()

    @property
    def sent(self) -> list[Notification]:
        """Notifications delivered to at least one sender, each once, in the order they were
        emitted (a snapshot: the senders' threads may still be adding to it)."""
        with self._lock:
            return [self._sent[seq] for seq in sorted(self._sent)]

    # ---- delivery (one background thread per sender) -----------------------------------------

    def _open_channels(self) -> list[_Channel]:
        return [_Channel(sender, self.cfg, self._record) for sender in self.senders]

    def _record(self, seq: int, note: Notification) -> None:
        with self._lock:
            self._sent.setdefault(seq, note)

    def _emit(
        self,
        trainer: Trainer,
        event: str,
        message: str,
        metrics: Mapping[str, float | None] | None = None,
        error: str | None = None,
    ) -> None:
        if not self.senders:
            return
        state = trainer.state
        note = Notification(
            event=event,
            run=trainer.cfg.name,
            message=message,
            step=state.step,
            total_steps=state.total_steps,
            run_dir=str(trainer.run_dir.path),
            metrics={k: float(v) for k, v in (metrics or {}).items() if v is not None},
            error=error,
        )
        seq = next(self._seq)
        for channel in self._channels:
            channel.submit(seq, note)

    def _flush(self) -> None:
        # Stop every channel first, then wait against one deadline: the senders drain in
        # parallel, so the whole flush takes at most flush_timeout_s however many hang.
        for channel in self._channels:
            channel.worker.stop()
        deadline = time.monotonic() + self.cfg.flush_timeout_s
        busy = [
            channel
            for channel in self._channels
            if not channel.worker.join(max(0.0, deadline - time.monotonic()))
        ]
        for channel in busy:
            channel.abandon()
        if busy:
            names = ", ".join(channel.sender.name for channel in busy)
            secrets = tuple(s for channel in busy for s in channel.secrets)
            log.warning(
                "%s",
                _redact(
                    f"notify: {names}: notifications still unsent after "
                    f"{self.cfg.flush_timeout_s:g} s (notify.flush_timeout_s); not waiting "
                    "for them",
                    secrets,
                ),
            )
        # Fresh channels (threads start on the first note), so the callback can serve another
        # fit(); the abandoned ones finish their request in progress and drop the rest.
        self._channels = self._open_channels()

    # ---- events -------------------------------------------------------------------------------

    def on_train_begin(self, trainer: Trainer) -> None:
        self._start = time.monotonic()
        state = trainer.state
        self._best = state.best_metric
        if "start" not in self.cfg.events:
            return
        name = trainer.cfg.name
        if trainer.resumed_from is not None:
            msg = f"kiln: run '{name}' resumed at step {state.step}/{state.total_steps}"
        else:
            msg = f"kiln: run '{name}' started: {state.total_steps} steps"
        self._emit(trainer, "start", f"{msg} ({trainer.run_dir.path})")

    def on_step_end(self, trainer: Trainer) -> None:
        every, step = self.cfg.every_steps, trainer.state.step
        if not every or step % every:
            return
        loss = trainer.state.last_train_loss  # the last logged value: no extra host sync
        text = "n/a" if loss is None else f"{loss:.4f}"
        self._emit(
            trainer,
            "progress",
            f"kiln: run '{trainer.cfg.name}' step {step}/{trainer.state.total_steps}, "
            f"train loss {text}, {_duration(time.monotonic() - self._start)} elapsed",
            {"train_loss": loss},
        )

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        state, previous = trainer.state, self._best
        self._best = state.best_metric
        improved = state.best_step == state.step and previous is not None
        if not improved or "best" not in self.cfg.events or state.best_metric == previous:
            return
        metric = trainer.cfg.checkpoint.metric
        self._emit(
            trainer,
            "best",
            f"kiln: run '{trainer.cfg.name}' new best {metric} {state.best_metric:.4f} at step "
            f"{state.step} (was {previous:.4f})",
            {**metrics, f"best_{metric}": state.best_metric},
        )

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        if path == trainer.run_dir.path / "final":
            self._final = path

    def on_train_end(self, trainer: Trainer) -> None:
        state, name = trainer.state, trainer.cfg.name
        reason = state.stop_reason or ""
        early = reason.lower().startswith(("early_stop", "early stop"))
        event = "early_stop" if early and "early_stop" in self.cfg.events else "end"
        if event in self.cfg.events:
            took = _duration(time.monotonic() - self._start)
            where = f"{state.step}/{state.total_steps}"
            if self._final is None:
                msg = (
                    f"kiln: run '{name}' paused at step {where} ({reason}); continue with --resume"
                )
            elif early:
                msg = f"kiln: run '{name}' stopped early at step {where} after {took}: {reason}"
            else:
                msg = f"kiln: run '{name}' finished {state.step} steps in {took}"
            metrics: dict[str, float | None] = {"train_loss": state.last_train_loss}
            metrics.update(state.last_val)
            if state.last_val.get("val_loss") is not None:
                msg += f"; val_loss {state.last_val['val_loss']:.4f}"
            if state.best_metric is not None:
                metric = trainer.cfg.checkpoint.metric
                metrics[f"best_{metric}"] = state.best_metric
                msg += f" (best {metric} {state.best_metric:.4f} at step {state.best_step})"
            if self._final is not None:
                msg += f"; final model: {self._final}"
            self._emit(trainer, event, msg, metrics)
        self._flush()

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        if "failure" in self.cfg.events:
            line = _first_line(exc)
            self._emit(
                trainer,
                "failure",
                f"kiln: run '{trainer.cfg.name}' failed at step {trainer.state.step}: {line}",
                error=line,
            )
        self._flush()
