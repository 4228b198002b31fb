"""Where a REST client's config may point: every key of a run config that names a file, a
directory or a store is confined to the server's state directory (docs/serve.md, "What a
client's config may name").

- Written: `data.cache_dir` under `<state>/cache` (its default there, shared by the jobs);
  `log.tensorboard.log_dir` and file/SQLite `log.mlflow.tracking_uri` under the job's own run
  directory; `output_dir` is the server's (`<state>/runs/<job id>`). Never anywhere else.
- Read: `data.train`, `data.val`, each `data.sources.<k>.path`, `model.name_or_path`,
  `tokenizer.name_or_path` under the state directory, or under a root the server was started
  with (`--allow-read DIR`); hub names (`hf:<name>` data, a hub model id) only with
  `--allow-hub`.

Relative paths are taken from the state directory (the base of a written key, for those) and
the config that runs holds them absolute and resolved, so the job's working directory does
not matter. A path is checked after resolving `..` and symlinks: a link out of the state
directory is outside. `PATH_KEYS` + `NOT_PATHS` classify every string field of `RunConfig`; a
test fails when a new one is in neither, so a path field cannot slip through unconfined.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kiln.errors import KilnError
from kiln.files import is_within, looks_local, resolve_path

__all__ = ["NOT_PATHS", "PATH_KEYS", "Confinement", "ConfinementError"]

READ_KEYS = (
    "data.train",
    "data.val",
    "data.sources.path",  # each source of a mixture (a list: data.sources.<k>.path)
    "model.name_or_path",
    "tokenizer.name_or_path",
)
CACHE_KEYS = ("data.cache_dir",)
RUN_KEYS = ("log.tensorboard.log_dir", "log.mlflow.tracking_uri")
SERVER_KEYS = ("output_dir",)
"""Set by the server whatever the client sends."""
URL_KEYS = ("notify.senders.api_url",)
"""Where a job sends the server's secrets (Twilio's auth token): the default only."""
PATH_KEYS = READ_KEYS + CACHE_KEYS + RUN_KEYS + SERVER_KEYS + URL_KEYS
"""Every key of a run config that names a place, each confined or refused here."""

NOT_PATHS = frozenset(
    {
        "name",  # one path component, validated by RunConfig
        "data.hf_split",
        "data.sources.name",  # a label in metrics and data_stats.json
        "data.text_field",
        "data.messages_field",
        "data.source_template",
        "data.target_template",
        "data.prompt_template",
        "data.response_template",
        "data.templates.prompt",
        "data.templates.response",
        "data.collator",
        "data.quality_field",
        "data.curriculum.difficulty",
        "data.augment.name",
        "data.augment.options",
        "train.device",
        "tokenizer.chat_template",  # a built-in name or Jinja (rendered in jinja2's sandbox)
        "eval.sample_prompt",
        "eval.generate.metrics",
        "eval.generate.prompt_split",
        "eval.early_stopping.metric",
        "checkpoint.metric",
        "lora.target_modules",
        "lora.modules_to_save",
        "log.wandb.project",
        "log.wandb.entity",
        "log.wandb.run_name",
        "log.wandb.group",
        "log.wandb.tags",
        "log.mlflow.experiment",
        "log.mlflow.run_name",
        "log.mlflow.parent_run_id",
        "notify.senders.url_env",
        "notify.senders.token_env",
        "notify.senders.account_sid_env",
        "notify.senders.auth_token_env",
        "notify.senders.from_env",
        "notify.senders.to_env",
    }
)
"""String fields that name no file: names, templates, metrics, module names, the names of
environment variables (whose values the server's environment holds)."""

_GLOB = re.compile(r"[*?[]")
_HF = "hf:"
_TWILIO = "https://api.twilio.com"


class ConfinementError(KilnError):
    """A client's config names a place the server does not let it use (one line a key)."""


@dataclass
class Confinement:
    """The places a client's config may name on this server."""

    state_dir: Path
    allow_read: tuple[Path, ...] = ()
    """Further roots jobs may read data, models and tokenizers from (`--allow-read`)."""
    allow_hub: bool = False
    """Hub names (`hf:` data, model ids) are allowed (`--allow-hub`)."""
    _roots: tuple[Path, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.state_dir = resolve_path(self.state_dir, "--state-dir")
        self._roots = (self.state_dir, *(resolve_path(p, "--allow-read") for p in self.allow_read))

    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "cache"

    def confine(self, config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        """`config` with every path key checked and made absolute, for a job whose run
        directory is `run_dir`; a missing `data.cache_dir` is set to `<state>/cache`.

        Raises:
            ConfinementError: one line per key that points outside, escapes, or names
                nothing (a read path that does not exist).
        """
        out = {**config, "output_dir": str(run_dir)}
        problems: list[str] = []
        run = resolve_path(run_dir, "output_dir")
        for key in READ_KEYS:
            self._each(out, key, problems, lambda k, v: self.read(k, v))
        for key, base in ((CACHE_KEYS[0], self.cache_dir), *((k, run) for k in RUN_KEYS)):
            self._each(out, key, problems, lambda k, v, b=base: self.write(k, v, b))
        data = out.get("data")
        if data is None or (isinstance(data, dict) and "cache_dir" not in data):
            out["data"] = {**(data or {}), "cache_dir": str(self.cache_dir)}
        problems += _foreign_urls(out.get("notify"))
        if problems:
            raise ConfinementError(problems)
        return out

    # ---- one key -------------------------------------------------------------------------

    def _each(
        self, config: dict[str, Any], key: str, problems: list[str], check: Any, where: str = ""
    ) -> None:
        """Apply `check(name, value)` to the value(s) at dotted `key` in place, through lists of
        sections on the way (`data.sources.path` is each source's, named data.sources.<k>.path);
        a shape the config schema refuses (not a dict, not a string) is left for it to name."""
        part, _, rest = key.partition(".")
        name = where + part
        if rest:  # copy along the way: the caller's dict stays as it was
            child = config.get(part)
            if isinstance(child, dict):
                config[part] = child = dict(child)
                self._each(child, rest, problems, check, f"{name}.")
            elif isinstance(child, list):
                config[part] = child = list(child)
                for i, item in enumerate(child):
                    if isinstance(item, dict):
                        child[i] = item = dict(item)
                        self._each(item, rest, problems, check, f"{name}.{i}.")
            return
        value = config.get(part)
        try:
            if isinstance(value, str):
                config[part] = check(name, value)
            elif isinstance(value, list) and name.startswith("data."):  # data.train: files
                config[part] = [
                    check(f"{name}.{i}", v) if isinstance(v, str) else v
                    for i, v in enumerate(value)
                ]
        except KilnError as exc:  # (resolve_path's too: a NUL byte, a symlink loop)
            problems += exc.problems

    def read(self, key: str, value: str) -> str:
        """A path jobs read (data, model, tokenizer), absolute; hub names as given."""
        hub = (
            value.startswith(_HF)
            if key.startswith(("data.", "dataset_path"))
            else (not looks_local(value) and not _exists(self.state_dir / value))
        )
        if hub:
            name = value.removeprefix(_HF)
            if not self.allow_hub:
                raise ConfinementError(
                    f"{key}: {value!r} is not a path in the server's "
                    "state directory (hub names need --allow-hub)"
                )
            if _exists(Path(name)):  # the loaders would take the server's local copy instead
                raise ConfinementError(
                    f"{key}: {value!r} names a path in the server's working "
                    "directory, outside its state directory"
                )
            return value
        path = self._absolute(value, self.state_dir)
        if _GLOB.search(value) and not _exists(path):
            return self._pattern(key, value, path)
        where = resolve_path(path, key)
        self._readable(key, value, where)
        if not _exists(where):
            raise ConfinementError(f"{key}: {value}: no such file or directory")
        return str(where)

    def _pattern(self, key: str, value: str, pattern: Path) -> str:
        """A glob: its literal part and every match must be readable."""
        literal = Path(*pattern.parts[: _first_glob(pattern.parts)])
        self._readable(key, value, resolve_path(literal, key))
        matches = glob.glob(str(pattern), recursive=True)
        if not matches:
            raise ConfinementError(f"{key}: {value}: no files match this pattern")
        for match in matches:
            self._readable(key, value, resolve_path(match, key))
        return str(pattern)

    def _readable(self, key: str, value: str, where: Path) -> None:
        if not any(is_within(where, root) for root in self._roots):
            extra = " or an --allow-read directory" if self.allow_read else ""
            raise ConfinementError(
                f"{key}: {value} is outside the server's state directory"
                f"{extra}: kiln serve reads only there"
            )

    def write(self, key: str, value: str, base: Path) -> str:
        """A place jobs write (a cache, tracker files), absolute, inside `base`."""
        if key == "log.mlflow.tracking_uri":
            return self._tracking_uri(key, value, base)
        return self._inside(key, value, value, base)

    def _inside(self, key: str, value: str, path: str, base: Path) -> str:
        where = resolve_path(self._absolute(path, base), key)
        if not is_within(where, resolve_path(base, key)):
            raise ConfinementError(
                f"{key}: {value} is outside {base}: a job of kiln serve writes only there"
            )
        return str(where)

    def _tracking_uri(self, key: str, value: str, base: Path) -> str:
        """MLflow's store: a path, `file:` or `sqlite:///` under `base`; no other scheme (a
        tracking server chosen by a client would get the server's MLflow credentials)."""
        if value.startswith("sqlite:///"):
            return "sqlite:///" + self._inside(key, value, value[len("sqlite:///") :], base)
        scheme = urlsplit(value).scheme
        if scheme == "file":
            return Path(self._inside(key, value, urlsplit(value).path, base)).as_uri()
        if len(scheme) > 1:  # (a drive letter is not a scheme)
            raise ConfinementError(
                f"{key}: {scheme}: URIs are not accepted by kiln serve; "
                "leave it unset (the server's $MLFLOW_TRACKING_URI, else "
                "<run_dir>/mlflow.db)"
            )
        return self._inside(key, value, value, base)

    @staticmethod
    def _absolute(value: str, base: Path) -> Path:
        path = Path(value).expanduser() if value.startswith("~") else Path(value)
        return path if path.is_absolute() else base / path


def _foreign_urls(notify: Any) -> list[str]:
    """Twilio senders with another `api_url` than Twilio's: the job would send the server's
    Twilio credentials (from its environment) to a place the client chose."""
    senders = notify.get("senders") if isinstance(notify, dict) else None
    problems = []
    for i, sender in enumerate(senders if isinstance(senders, list) else []):
        url = sender.get("api_url") if isinstance(sender, dict) else None
        if isinstance(url, str) and url.rstrip("/") != _TWILIO:
            problems.append(
                f"notify.senders.{i}.api_url: a job of kiln serve sends Twilio's "
                f"credentials to {_TWILIO} only"
            )
    return problems


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long, a NUL byte: nothing is there
        return False


def _first_glob(parts: tuple[str, ...]) -> int:
    return next(i for i, part in enumerate(parts) if _GLOB.search(part))
