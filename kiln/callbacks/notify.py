"""Notifications about a run: Discord, Slack, any JSON webhook, SMS through Twilio.

Secrets (webhook URLs, tokens, phone numbers) are read from the environment variables the
config names, when the callback is built; they are never written to the run directory or the
log (warnings redact them). Sending happens on a background thread with a timeout and retries,
so a slow or dead endpoint never holds up training; at the end of the run the queue gets at
most `notify.flush_timeout_s` to drain.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
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


def build_senders(cfg: NotifyConfig, environ: Mapping[str, str] | None = None) -> list[Sender]:
    """The senders of `notify.senders` whose environment variables are set; each one with a
    missing variable is skipped with a warning naming the variable (never a value)."""
    env = os.environ if environ is None else environ
    senders: list[Sender] = []
    for i, spec in enumerate(cfg.senders):
        if isinstance(spec, TwilioSender):
            names = [spec.account_sid_env, spec.auth_token_env, spec.from_env, spec.to_env]
        elif isinstance(spec, WebhookSender) and spec.token_env:
            names = [spec.url_env, spec.token_env]
        else:
            names = [spec.url_env]
        missing = [n for n in names if not env.get(n)]
        if missing:
            log.warning(
                "notify.senders.%d (%s): environment variable %s is not set; this sender is off",
                i,
                spec.kind,
                ", ".join(missing),
            )
            continue
        values = [env[n] for n in names]
        sender: Sender
        if isinstance(spec, DiscordSender):
            sender = DiscordWebhook(values[0])
        elif isinstance(spec, SlackSender):
            sender = SlackWebhook(values[0])
        elif isinstance(spec, WebhookSender):
            sender = JsonWebhook(values[0], values[1] if spec.token_env else None)
        else:
            sender = TwilioSMS(*values, api_url=spec.api_url)
        senders.append(sender)
    return senders


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class NotifyCallback(Callback):
    """Sends the events of `notify.events` (and progress every `notify.every_steps`) to every
    sender. Delivery is off the training thread; a sender that keeps failing gets one warning.
    """

    def __init__(
        self,
        cfg: NotifyConfig,
        senders: list[Sender] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.senders = build_senders(cfg, environ) if senders is None else list(senders)
        self.worker = Worker("kiln-notify")
        self.sent: list[Notification] = []
        """Notifications delivered to at least one sender (for tests and reports)."""
        self._warned: set[str] = set()
        self._best: float | None = None
        self._final: Path | None = None
        self._start = time.monotonic()

    # ---- delivery (background thread) ---------------------------------------------------------

    def _deliver(self, sender: Sender, note: Notification) -> None:
        error: Exception | None = None
        for attempt in range(self.cfg.retries + 1):
            try:
                sender.send(note, self.cfg.timeout_s)
            except Exception as exc:
                error = exc
                if attempt < self.cfg.retries:
                    time.sleep(min(0.5 * 2**attempt, 5.0))
                continue
            self.sent.append(note)
            return
        text = _redact(_first_line(error), sender.secrets) if error else "unknown error"
        if sender.name in self._warned:
            log.debug("notify: %s: %s not sent (%s)", sender.name, note.event, text)
            return
        self._warned.add(sender.name)
        log.warning(
            "notify: %s: could not send the %s notification after %d attempts (%s); "
            "training goes on (later failures of this sender are not reported)",
            sender.name,
            note.event,
            self.cfg.retries + 1,
            text,
        )

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
        for sender in self.senders:
            self.worker.submit(self._deliver, sender, note)

    def _flush(self) -> None:
        if not self.worker.close(self.cfg.flush_timeout_s):
            log.warning(
                "notify: notifications still unsent after %g s (notify.flush_timeout_s); "
                "not waiting for them",
                self.cfg.flush_timeout_s,
            )

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
