"""Notifications about a run: Discord, Slack, any JSON webhook, SMS through Twilio, and any
sender registered in `NOTIFIERS`.

Secrets (webhook URLs, tokens, phone numbers) are read from the environment variables the
config names, when the callback is built: a variable that is unset or empty is a `KilnError`
then, before any training work, naming the config key (never the variable or a value). They
are never written to the run directory or the log (warnings redact them).

Each sender runs on its own `kiln.callbacks.background.Lane` (the failure policy it shares
with the trackers) and spends its own time budget there (a timeout per request, retries with
backoff): a slow, hanging or dead endpoint never holds up training, nor another sender's
notes. A sender that keeps failing gets one warning, and keeps trying the later notes. At the
end of the run (or on a failure) all senders drain in parallel for at most
`notify.flush_timeout_s` in total; a sender still busy then is abandoned: its daemon thread
drops what is still queued and never holds up the process's exit.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from kiln.callbacks.background import Lane, describe, drain
from kiln.callbacks.base import Callback
from kiln.config.tracking import NotifyConfig
from kiln.engine.status import final_state
from kiln.errors import KilnError
from kiln.registry import Registry, UnknownName

if TYPE_CHECKING:
    from kiln.engine.control import CheckpointKind, RunView

__all__ = [
    "NOTIFIERS",
    "DiscordWebhook",
    "JsonWebhook",
    "Notification",
    "NotifyCallback",
    "Outbox",
    "Sender",
    "SenderFactory",
    "SlackWebhook",
    "TwilioSMS",
    "build_senders",
]

_USER_AGENT = "kiln-notify/1"


@dataclass(frozen=True)
class Notification:
    """One event of a run, as sent (the generic webhook receives exactly `to_json()`)."""

    event: str
    """start | end | failure | best | early_stop | diverged | progress."""
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
class _ChatWebhook:
    """A chat service's incoming webhook: the message as one JSON field, cut to the service's
    limit, plus fixed fields."""

    url: str
    field: ClassVar[str]
    limit: ClassVar[int | None] = None
    fixed: ClassVar[dict[str, str]] = {}

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.url,)

    def send(self, note: Notification, timeout: float) -> None:
        payload = {self.field: note.message[: self.limit], **self.fixed}
        _post_json(self.url, payload, timeout)


@dataclass
class DiscordWebhook(_ChatWebhook):
    """A Discord channel webhook (the message as `content`, at most 2000 characters)."""

    name: str = "discord"
    field: ClassVar[str] = "content"
    limit: ClassVar[int | None] = 2000
    fixed: ClassVar[dict[str, str]] = {"username": "kiln"}


@dataclass
class SlackWebhook(_ChatWebhook):
    """A Slack incoming webhook (the message as `text`)."""

    name: str = "slack"
    field: ClassVar[str] = "text"


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


SenderFactory = Callable[[Any, Mapping[str, str]], Sender]
"""Builds a sender from its `notify.senders` entry and the secrets read for it, by field name
without `_env` (`url`, `token`, `account_sid`, `from`, ...)."""

NOTIFIERS: Registry[SenderFactory] = Registry("notifier")
"""Senders by `kind` (`kiln.registry.Registry`): discord, slack, webhook, twilio."""


@NOTIFIERS.register("discord")
def _discord(spec: Any, secrets: Mapping[str, str]) -> Sender:
    return DiscordWebhook(secrets["url"])


@NOTIFIERS.register("slack")
def _slack(spec: Any, secrets: Mapping[str, str]) -> Sender:
    return SlackWebhook(secrets["url"])


@NOTIFIERS.register("webhook")
def _webhook(spec: Any, secrets: Mapping[str, str]) -> Sender:
    return JsonWebhook(secrets["url"], secrets.get("token"))


@NOTIFIERS.register("twilio")
def _twilio(spec: Any, secrets: Mapping[str, str]) -> Sender:
    return TwilioSMS(
        secrets["account_sid"],
        secrets["auth_token"],
        secrets["from"],
        secrets["to"],
        api_url=spec.api_url,
    )


def _env_keys(spec: Any) -> list[str]:
    """The keys of `spec` that name an environment variable (`*_env`, when set), in order."""
    return [k for k in type(spec).model_fields if k.endswith("_env") and getattr(spec, k)]


def build_senders(cfg: NotifyConfig, environ: Mapping[str, str] | None = None) -> list[Sender]:
    """The senders of `notify.senders`, with their secrets read from the environment.

    Raises:
        KilnError: a variable a sender names is unset or empty (one line per such key). A line
            names the config key (`notify.senders.0.url_env`), never the variable or a value:
            a user may have pasted a secret where the variable's name goes.
    """
    env = os.environ if environ is None else environ
    problems: list[str] = []
    specs: list[tuple[SenderFactory, Any, dict[str, str]]] = []
    for i, spec in enumerate(cfg.senders):
        try:
            factory = NOTIFIERS.get(spec.kind)
        except UnknownName as exc:
            problems.append(f"notify.senders.{i}.kind: {exc}")
            continue
        # Stray whitespace (a .env file with CRLF line ends) would only make every request
        # fail later, with an error message that may quote the secret.
        secrets = {key: env.get(getattr(spec, key), "").strip() for key in _env_keys(spec)}
        problems += [
            f"notify.senders.{i}.{key}: the environment variable named here is not set (or is "
            "empty); set it, or remove this sender"
            for key, value in secrets.items()
            if not value
        ]
        specs.append((factory, spec, {k.removesuffix("_env"): v for k, v in secrets.items()}))
    if problems:
        raise KilnError(problems)
    return [factory(spec, secrets) for factory, spec, secrets in specs]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class _Channel:
    """One sender on its own lane, with its own time budget (a timeout per request, retries
    with backoff), so a sender that hangs or keeps failing delays only its own notes."""

    def __init__(
        self, sender: Sender, cfg: NotifyConfig, on_sent: Callable[[int, Notification], None]
    ) -> None:
        self.sender = sender
        self.cfg = cfg
        self._on_sent = on_sent
        # Not switched off by a failure: each note stands alone, and the end or failure note
        # after a passing outage is the one that matters most.
        self.lane = Lane("notify", sender.name, secrets=tuple(sender.secrets), switch_off=False)

    def submit(self, seq: int, note: Notification) -> None:
        self.lane.submit(self._deliver, seq, note)

    def _deliver(self, seq: int, note: Notification) -> None:
        error: Exception | None = None
        attempts = 0
        for attempt in range(self.cfg.retries + 1):
            # Backoff 0.5 s, 1 s, 2 s, ... (at most 5 s); cut short when abandoned.
            if attempt and self.lane.wait(min(0.5 * 2 ** (attempt - 1), 5.0)):
                break
            attempts += 1
            try:
                self.sender.send(note, self.cfg.timeout_s)
            except Exception as exc:
                error = exc
                continue
            self._on_sent(seq, note)
            return
        if error is not None:
            self.lane.fail(
                error, f" to send the {note.event} notification after {attempts} attempts"
            )


class Outbox:
    """The one delivery of notifications, for a run (`NotifyCallback`) and for a sweep (its
    controller's notes): each sender on its own lane (`_Channel`), notes numbered in the order
    they were sent, `flush` to drain them all within `notify.flush_timeout_s`."""

    def __init__(self, senders: list[Sender], cfg: NotifyConfig) -> None:
        self.senders = list(senders)
        self.cfg = cfg
        self._channels = self._open_channels()
        self._seq = itertools.count()
        self._lock = threading.Lock()  # the channels' threads record deliveries concurrently
        self._sent: dict[int, Notification] = {}

    @property
    def sent(self) -> list[Notification]:
        """Notifications delivered to at least one sender, each once, in the order they were
        sent (a snapshot: the senders' threads may still be adding to it)."""
        with self._lock:
            return [self._sent[seq] for seq in sorted(self._sent)]

    def _open_channels(self) -> list[_Channel]:
        return [_Channel(sender, self.cfg, self._record) for sender in self.senders]

    def _record(self, seq: int, note: Notification) -> None:
        with self._lock:
            self._sent.setdefault(seq, note)

    def send(self, note: Notification) -> None:
        """Queue `note` for every sender (returns at once)."""
        seq = next(self._seq)
        for channel in self._channels:
            channel.submit(seq, note)

    def flush(self) -> None:
        """Wait for every sender to deliver what it was given, for at most
        `notify.flush_timeout_s` in all; a sender still busy then is abandoned."""
        drain([c.lane for c in self._channels], self.cfg.flush_timeout_s, "notify.flush_timeout_s")
        # Fresh channels (threads start on the first note), so the outbox can serve again
        # (another fit()); the abandoned ones finish their request in progress and drop the rest.
        self._channels = self._open_channels()


class NotifyCallback(Callback):
    """Sends the events of `notify.events` (and progress every `notify.every_steps`) to every
    sender. Delivery is off the training thread, one lane per sender; a sender that keeps
    failing gets one warning.
    """

    state_key = "notify"

    def __init__(
        self,
        cfg: NotifyConfig,
        senders: list[Sender] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.senders = build_senders(cfg, environ) if senders is None else list(senders)
        self._outbox = Outbox(self.senders, cfg)
        self._best: float | None = None
        self._final: Path | None = None
        self._start = time.monotonic()

    @property
    def sent(self) -> list[Notification]:
        """Notifications delivered to at least one sender, each once, in the order they were
        emitted (a snapshot: the senders' threads may still be adding to it)."""
        return self._outbox.sent

    # ---- delivery (`Outbox`: one lane per sender) ---------------------------------------------

    def _emit(
        self,
        run: RunView,
        event: str,
        message: str,
        metrics: Mapping[str, float | None] | None = None,
        error: str | None = None,
    ) -> None:
        if not self.senders:
            return
        state = run.state
        note = Notification(
            event=event,
            run=run.cfg.name,
            message=message,
            step=state.step,
            total_steps=state.total_steps,
            run_dir=str(run.run_dir),
            metrics={k: float(v) for k, v in (metrics or {}).items() if v is not None},
            error=error,
        )
        self._outbox.send(note)

    def _flush(self) -> None:
        self._outbox.flush()

    # ---- events -------------------------------------------------------------------------------

    def on_train_begin(self, run: RunView) -> None:
        self._start = time.monotonic()
        self._final = None
        state = run.state
        self._best = state.best_metric
        if "start" not in self.cfg.events:
            return
        name = run.cfg.name
        if run.resumed_from is not None:
            msg = f"kiln: run '{name}' resumed at step {state.step}/{state.total_steps}"
        else:
            msg = f"kiln: run '{name}' started: {state.total_steps} steps"
        self._emit(run, "start", f"{msg} ({run.run_dir})")

    def on_step_end(self, run: RunView) -> None:
        every, step = self.cfg.every_steps, run.state.step
        if not every or step % every:
            return
        loss = run.state.last_train_loss  # the last logged value: no extra host sync
        text = "n/a" if loss is None else f"{loss:.4f}"
        self._emit(
            run,
            "progress",
            f"kiln: run '{run.cfg.name}' step {step}/{run.state.total_steps}, "
            f"train loss {text}, {_duration(time.monotonic() - self._start)} elapsed",
            {"train_loss": loss},
        )

    def on_validation_end(self, run: RunView, metrics: dict[str, float]) -> None:
        state, previous = run.state, self._best
        self._best = state.best_metric
        improved = state.best_step == state.step and previous is not None
        if not improved or "best" not in self.cfg.events or state.best_metric == previous:
            return
        metric = run.cfg.checkpoint.metric
        self._emit(
            run,
            "best",
            f"kiln: run '{run.cfg.name}' new best {metric} {state.best_metric:.4f} at step "
            f"{state.step} (was {previous:.4f})",
            {**metrics, f"best_{metric}": state.best_metric},
        )

    def on_checkpoint(self, run: RunView, path: Path, kind: CheckpointKind) -> None:
        if kind == "final":
            self._final = path

    def on_train_end(self, run: RunView) -> None:
        event, msg = self._end_note(run)
        if event in self.cfg.events:
            state = run.state
            metrics: dict[str, float | None] = {"train_loss": state.last_train_loss}
            metrics.update(state.last_val)
            if state.last_val.get("val_loss") is not None:
                msg += f"; val_loss {state.last_val['val_loss']:.4f}"
            if state.best_metric is not None:
                metric = run.cfg.checkpoint.metric
                metrics[f"best_{metric}"] = state.best_metric
                msg += f" (best {metric} {state.best_metric:.4f} at step {state.best_step})"
            if self._final is not None:
                msg += f"; final model: {self._final}"
            failed = event in ("failure", "diverged")
            error = run.stop.reason if failed and run.stop is not None else None
            self._emit(run, event, msg, metrics, error=error)
        self._flush()

    def _end_note(self, run: RunView) -> tuple[str, str]:
        """(event, message) for a run that returned from its loop, by how it ended."""
        stop, name, state = run.stop, run.cfg.name, run.state
        where = f"{state.step}/{state.total_steps}"
        took = _duration(time.monotonic() - self._start)
        if stop is None:
            return "end", f"kiln: run '{name}' finished {state.step} steps in {took}"
        ended = final_state(stop)[0]  # as status.json says
        if ended == "diverged":  # a failure the loop caught: on_exception does not fire
            event = "diverged" if "diverged" in self.cfg.events else "failure"
            return event, f"kiln: run '{name}' stopped at step {where}: {stop.reason}"
        if ended == "paused":
            why = f"({stop.reason}); continue with --resume"
            return "end", f"kiln: run '{name}' paused at step {where} {why}"
        if ended == "stopped":  # e.g. pruned by a sweep
            return "end", f"kiln: run '{name}' stopped at step {where} ({stop.reason})"
        if stop.kind == "early_stop":
            event = "early_stop" if "early_stop" in self.cfg.events else "end"
            msg = f"kiln: run '{name}' stopped early at step {where} after {took}"
            return event, f"{msg}: {stop.reason}"
        return "end", f"kiln: run '{name}' finished {state.step} steps in {took} ({stop.reason})"

    def on_exception(self, run: RunView, exc: BaseException) -> None:
        if "failure" in self.cfg.events:
            line = describe(exc)
            self._emit(
                run,
                "failure",
                f"kiln: run '{run.cfg.name}' failed at step {run.state.step}: {line}",
                error=line,
            )
        self._flush()
