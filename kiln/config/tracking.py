"""Logging, tracking and notification sections.

Secrets never live in the config: a notification sender names the environment variables that
hold its webhook URL or API credentials, so config.yaml (written into every run directory)
stays free of them. A field that should name a variable but looks like anything else (a URL,
a token) is rejected without echoing the value, and so is a URL with credentials in it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import BeforeValidator, Field, field_validator

from kiln.config.base import MAX_COUNT, MAX_SECONDS, Section, short_repr

__all__ = [
    "DiscordSender",
    "LogConfig",
    "MlflowOptions",
    "NotifyConfig",
    "SlackSender",
    "TensorBoardOptions",
    "TwilioSender",
    "WandbOptions",
    "WebhookSender",
]

# The conventional form only: a pasted secret (hex, base64, a URL) almost never fits it.
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")


def _env_name(value: Any) -> Any:
    # Before pydantic's own check, whose message would echo a non-string value. The message
    # must not include `value`: a user may have pasted the secret itself here.
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise ValueError(
            "must be the name of an environment variable that holds the secret, in upper "
            "case (e.g. KILN_SLACK_WEBHOOK_URL), not the secret itself"
        )
    return value


EnvName = Annotated[str, BeforeValidator(_env_name)]

# Query parameter names that carry credentials: whole words, and parts of longer names.
_SECRET_WORDS = frozenset({"auth", "jwt", "key", "pass", "pwd", "sas", "sig"})
_SECRET_PARTS = (
    "apikey",
    "authoriz",
    "credential",
    "passw",
    "secret",
    "session",
    "signature",
    "token",
)


def _secret_param(name: str) -> bool:
    """Whether a URL query parameter named `name` looks like it carries a secret."""
    # Words of snake_case, kebab-case and camelCase names: X-Amz-Signature, AWSAccessKeyId.
    words = [w.lower() for w in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", name)]
    joined = "".join(words)
    return not _SECRET_WORDS.isdisjoint(words) or any(p in joined for p in _SECRET_PARTS)


def _without_credentials(url: str, hint: str) -> str:
    """`url`, or ValueError(what it holds; `hint`) if it holds credentials: user info or a
    token-like query parameter. The message names the parameter, never a secret."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("is not a valid URL") from None
    params = parse_qsl(parts.query, keep_blank_values=True)
    params += parse_qsl(parts.fragment, keep_blank_values=True)  # OAuth's #access_token=
    secret = [name for name, _ in params if _secret_param(name)]
    if parts.password:
        raise ValueError(f"holds a password; {hint}")
    if "@" in parts.netloc:
        raise ValueError(f"holds credentials (user info before '@'); {hint}")
    if secret:
        raise ValueError(f"holds credentials (query parameter {short_repr(secret[0])}); {hint}")
    return url


class TensorBoardOptions(Section):
    log_dir: str | None = None
    """Directory for TensorBoard event files; default <run_dir>/tensorboard."""


class WandbOptions(Section):
    project: str = "kiln"
    """W&B project."""
    entity: str | None = None
    """W&B entity (user or team); default the account's default entity."""
    run_name: str | None = None
    """Display name of the W&B run; default the run's `name`."""
    group: str | None = None
    """W&B group, to gather related runs (a sweep, a seed study)."""
    tags: list[str] = Field(default_factory=list)
    """W&B tags."""
    mode: Literal["auto", "online", "offline"] = "auto"
    """auto: online when WANDB_API_KEY is set, else offline (files under <run_dir>/wandb, for
    `wandb sync` later); offline never touches the network."""
    log_model: bool = False
    """Also upload final/ as a W&B model artifact (its path is always in the run summary)."""


class MlflowOptions(Section):
    tracking_uri: str | None = None
    """MLflow tracking URI (sqlite:///..., file:..., http(s)://server); default
    $MLFLOW_TRACKING_URI, else an SQLite store at <run_dir>/mlflow.db. Credentials go in
    MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, never in the URI."""
    experiment: str = "kiln"
    """MLflow experiment name (created when missing)."""
    run_name: str | None = None
    """MLflow run name; default the run's `name`."""
    log_model: bool = False
    """Also copy final/ into the MLflow run's artifacts (its path is always a run tag)."""
    parent_run_id: str | None = None
    """Nest this run under that MLflow run (tag mlflow.parentRunId): `kiln sweep` sets it to
    the sweep's parent run, so a sweep's trials show as one group."""

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        hint = (
            "put credentials in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "(or MLFLOW_TRACKING_TOKEN) instead"
        )
        return value and _without_credentials(value, hint)


class LogConfig(Section):
    every_steps: int = Field(10, gt=0, le=MAX_COUNT)
    """Log train loss, LR and throughput every N optimizer steps (the only host syncs)."""
    progress: Literal["auto", "bar", "plain", "none"] = "auto"
    """Progress on stderr: bar (a live bar), plain (a line per log step and per validation),
    none, or auto: the bar when stderr is a TTY, else plain (docker logs, nohup, CI)."""
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    """Experiment trackers that receive params, metrics and artifacts, besides metrics.jsonl
    (always written). A tracker that fails is switched off with one warning."""
    tensorboard: TensorBoardOptions = TensorBoardOptions()
    """TensorBoard options (used when `loggers` lists tensorboard)."""
    wandb: WandbOptions = WandbOptions()
    """Weights & Biases options (used when `loggers` lists wandb)."""
    mlflow: MlflowOptions = MlflowOptions()
    """MLflow options (used when `loggers` lists mlflow)."""
    plots: bool = True
    """Draw PNG curves (loss, LR, each eval metric) into <run_dir>/plots at the end of a run;
    needs matplotlib (`pip install 'kiln[plots]'`), skipped with a warning without it."""
    close_timeout_s: float = Field(120.0, gt=0, le=MAX_SECONDS)
    """At the end of a run, wait at most this long for trackers to finish writing/uploading."""

    @field_validator("loggers")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a logger twice")
        return value


class DiscordSender(Section):
    kind: Literal["discord"]
    """A Discord channel webhook."""
    url_env: EnvName = "KILN_DISCORD_WEBHOOK_URL"
    """Environment variable that holds the webhook URL."""


class SlackSender(Section):
    kind: Literal["slack"]
    """A Slack incoming webhook."""
    url_env: EnvName = "KILN_SLACK_WEBHOOK_URL"
    """Environment variable that holds the webhook URL."""


class WebhookSender(Section):
    kind: Literal["webhook"]
    """Any HTTP endpoint: receives the notification as a JSON object (POST)."""
    url_env: EnvName = "KILN_WEBHOOK_URL"
    """Environment variable that holds the endpoint URL."""
    token_env: EnvName | None = None
    """Environment variable with a bearer token sent as `Authorization: Bearer ...` (optional)."""


class TwilioSender(Section):
    kind: Literal["twilio"]
    """An SMS through Twilio's REST API."""
    account_sid_env: EnvName = "TWILIO_ACCOUNT_SID"
    """Environment variable that holds the Twilio account SID."""
    auth_token_env: EnvName = "TWILIO_AUTH_TOKEN"
    """Environment variable that holds the Twilio auth token."""
    from_env: EnvName = "TWILIO_FROM_NUMBER"
    """Environment variable with the sending phone number (E.164, e.g. +15550001111)."""
    to_env: EnvName = "TWILIO_TO_NUMBER"
    """Environment variable with the receiving phone number."""
    api_url: str = "https://api.twilio.com"
    """Base URL of the Twilio API (change only for a proxy or a test server)."""

    @field_validator("api_url")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        hint = "the credentials come from account_sid_env and auth_token_env"
        if urlsplit(_without_credentials(value, hint)).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return value


Sender = Annotated[
    DiscordSender | SlackSender | WebhookSender | TwilioSender, Field(discriminator="kind")
]


class NotifyConfig(Section):
    senders: list[Sender] = Field(default_factory=list)
    """Where notifications go: a list of {kind: discord|slack|webhook|twilio, ...}; each names
    the environment variables that hold its secrets. Empty: no notifications."""
    events: list[Literal["start", "end", "failure", "best", "early_stop", "diverged"]] = Field(
        default_factory=lambda: ["start", "end", "failure", "early_stop", "diverged"]
    )
    """Events to notify about: start, end, failure (with the error line), best (the
    checkpoint.metric improved), early_stop (sent instead of end when early stopping ended
    the run), diverged (sent instead of failure when the run stopped as diverged, with the
    verdict: train.anomaly)."""
    every_steps: int | None = Field(None, gt=0, le=MAX_COUNT)
    """Also send a progress note (step, last train loss, tokens/s) every N optimizer steps."""
    timeout_s: float = Field(10.0, gt=0, le=MAX_SECONDS)
    """Timeout of one HTTP request."""
    retries: int = Field(2, ge=0, le=100)
    """Retries of a failed request (backoff 0.5 s, 1 s, 2 s, ... up to 5 s)."""
    flush_timeout_s: float = Field(15.0, ge=0, le=MAX_SECONDS)
    """At the end of a run (or a failure), wait at most this long for queued notifications."""
