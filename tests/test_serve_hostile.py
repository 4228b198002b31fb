"""`kiln serve` against hostile input (issue 26, items 8-14): every bad request is a 4xx with
a JSON error, every bad server argument one `kiln: error:` line and exit 2, and every path a
client's config can name stays inside the server's state directory. In process (the app
through TestClient, `kiln serve` through `kiln.cli.main`) except one real subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import typing
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port, make_rows, write_jsonl
from serve_helpers import serve_config

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from kiln.serve.app import Settings, create_app
from kiln.serve.store import JobRow

START = "/api/training/jobs/start"


def _app(state: Path, **settings: Any) -> Any:
    return create_app(Settings(state, dry_run=True, **settings))


def _job(app: Any, run_dir: Path, state: str = "succeeded", job_id: str = "j") -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    app.state.store.add_job(
        JobRow(
            id=job_id,
            name=job_id,
            config={},
            run_dir=str(run_dir),
            state=state,
            attempt=1,
            resume=False,
            created=time.time(),
        )
    )
    return job_id


def _data_in(state: Path) -> dict[str, Any]:
    """A tiny job's config whose data lies inside the state directory."""
    raw = serve_config(state.parent)
    for split in ("train", "val"):
        where = state / "data" / f"{split}.jsonl"
        where.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(where, make_rows(12, seed=len(split)))
        raw["data"][split] = str(where)
    return raw


# ---- item 8: Last-Event-ID ----------------------------------------------------------------


@pytest.mark.parametrize("given", ["abc", "1.5", "9" * 5000, "\uff11\uff12"])
def test_item08_last_event_id_not_an_integer_is_400(tmp_path: Path, given: str) -> None:
    app = _app(tmp_path / "state")
    job = _job(app, tmp_path / "state" / "runs" / "j")
    with TestClient(app) as http:
        answer = http.get(
            f"/api/training/jobs/{job}/events", headers={"Last-Event-ID": given.encode()}
        )
        assert answer.status_code == 400, answer.text
        assert answer.json()["detail"].startswith("Last-Event-ID: expected a step number")
        fine = http.get(f"/api/training/jobs/{job}/events", headers={"Last-Event-ID": " 3 "})
        assert fine.status_code == 200
        assert "event: end" in fine.text


# ---- item 9: deep and huge bodies ---------------------------------------------------------


@pytest.mark.parametrize("route", [START, "/api/training/configs", "/api/training/configs/explain"])
def test_item09_a_config_nested_900_deep_is_one_422(tmp_path: Path, route: str) -> None:
    body = '{"name": "x", "config": ' + '{"a": ' * 900 + "1" + "}" * 900 + "}"
    with TestClient(_app(tmp_path / "state")) as http:
        answer = http.post(route, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"] == ["config: Value error, nested more than 32 levels deep"]


def test_item09_a_body_over_the_limit_is_413_declared_or_chunked(tmp_path: Path) -> None:
    from kiln.serve.app import MAX_BODY

    huge = b'{"config": {"name": "' + b"x" * MAX_BODY + b'"}}'
    with TestClient(_app(tmp_path / "state")) as http:
        declared = http.post(START, content=huge, headers={"content-type": "application/json"})
        chunked = http.post(
            START,
            content=iter([huge[:1000], huge[1000:]]),
            headers={"content-type": "application/json"},
        )
        bad_length = http.post(START, content=b"{}", headers={"content-length": "x1"})
    for answer in (declared, chunked):
        assert answer.status_code == 413, answer.text
        assert answer.json() == {"detail": f"the request body is over {MAX_BODY} bytes"}
    assert bad_length.status_code == 400


# ---- item 10: metrics lines the server cannot use -----------------------------------------


def test_item10_bad_steps_and_null_or_nan_values_are_skipped_or_null(tmp_path: Path) -> None:
    app = _app(tmp_path / "state")
    run = tmp_path / "state" / "runs" / "j"
    job = _job(app, run)
    lines = [
        '{"step": null, "split": "train", "loss": 1}',
        '{"step": "x", "split": "train"}',
        '{"step": true, "split": "train"}',
        '{"step": 1.5, "split": "train"}',
        "[1]",
        '{"step": 1, "split": "train", "loss": null}',
        '{"step": 2, "split": "train", "loss": NaN, "lr": Infinity}',
        '{"step": 3, "split": "train", "loss": 0.5}',
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "status.json").write_text('{"format": 1, "state": "finished", "eta_s": NaN, "step": 3}')
    with TestClient(app) as http:
        whole = http.get(f"/api/training/jobs/{job}/metrics/history")
        history = http.get(f"/api/training/jobs/{job}/metrics/history", params={"max_points": 2})
        latest = http.get(f"/api/training/jobs/{job}/metrics")
        status = http.get(f"/api/training/jobs/{job}/status")
        events = http.get(f"/api/training/jobs/{job}/events")
    assert history.status_code == 200, history.text
    assert [(r["step"], r["loss"]) for r in whole.json()["train"]] == [
        (1, None),
        (2, None),
        (3, 0.5),
    ]
    assert [r["step"] for r in history.json()["train"]] == [3]  # the one finite loss
    assert latest.json()["train"] == {"step": 3, "split": "train", "loss": 0.5}
    assert status.status_code == 200
    assert status.json()["eta_s"] is None
    data = [json.loads(x[6:]) for x in events.text.splitlines() if x.startswith('data: {"step')]
    assert [(r["step"], r["loss"]) for r in data] == [(1, None), (2, None), (3, 0.5)]
    assert data[1]["lr"] is None  # valid JSON: no bare NaN or Infinity


# ---- item 11: kiln serve arguments --------------------------------------------------------


def _serve(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    from kiln.cli import main

    code = main(["serve", "--port", "0", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_item11_unusable_server_arguments_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    closed = free_port()
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "kiln-serve.db").mkdir()  # SQLite cannot open a directory as its database
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    cases = {
        "is a file, not a directory": ["--state-dir", str(a_file)],
        "--db nosuchdb://x/y: cannot open the database": [
            "--state-dir",
            str(tmp_path / "s1"),
            "--db",
            "nosuchdb://x/y",
        ],
        "cannot open the database": [
            "--state-dir",
            str(tmp_path / "s2"),
            "--db",
            f"postgresql+psycopg://kiln:pw@127.0.0.1:{closed}/x",
        ],
        "its database driver is not installed": [
            "--state-dir",
            str(tmp_path / "s3"),
            "--db",
            "mysql://kiln@127.0.0.1/x",
        ],
        f"--state-dir {locked}: cannot open the database": ["--state-dir", str(locked)],
        "--port: 0 to 65535, got 70000": ["--state-dir", str(tmp_path / "s4"), "--port", "70000"],
        "in use by another process": [
            "--state-dir",
            str(tmp_path / "s5"),
            "--port",
            str(taken.getsockname()[1]),
        ],
        "--allow-read /no/such/dir: no such directory": [
            "--state-dir",
            str(tmp_path / "s6"),
            "--allow-read",
            "/no/such/dir",
        ],
    }
    try:
        for expected, args in cases.items():
            code, err = _serve(capsys, *args)
            assert (code, len(err)) == (2, 1), (args, err)
            assert err[0].startswith("kiln: error: "), (args, err)
            assert expected in err[0], (args, err)
            assert "pw@" not in err[0]  # a password in the URL is not printed
    finally:
        taken.close()


# ---- item 12: a job killed while the server runs ------------------------------------------


def test_item12_a_job_killed_by_a_signal_the_server_did_not_send_is_lost(tmp_path: Path) -> None:
    from kiln.serve.executor import LocalExecutor
    from kiln.serve.queue import state_for_exit
    from kiln.serve.store import Store

    class Sleeper(LocalExecutor):  # a job that is a real process, without a training run
        def command(self, job: JobRow) -> list[str]:
            run = Path(job.run_dir)
            run.mkdir(parents=True, exist_ok=True)
            (run / "status.json").write_text('{"format": 1, "state": "running", "step": 3}')
            return [sys.executable, "-c", "import time; time.sleep(60)"]

    store = Store(f"sqlite:///{tmp_path / 'serve.db'}")
    for job_id in ("killed", "stopped"):
        store.add_job(
            JobRow(
                id=job_id,
                name=job_id,
                config={},
                state="queued",
                attempt=0,
                run_dir=str(tmp_path / "runs" / job_id),
                resume=False,
                created=time.time(),
            )
        )
    executor = Sleeper(store, max_concurrent=2, grace_s=0)
    executor.tick()  # both start
    killed, stopped = store.job("killed"), store.job("stopped")
    os.killpg(killed.pid, signal.SIGKILL)  # the OOM killer, say
    executor.stop(stopped)  # SIGTERM, then SIGKILL at once (grace 0)
    for proc in list(executor.procs.values()):
        proc.wait(timeout=30)
    executor.tick()
    executor.tick()
    assert store.job("killed").state == "lost"
    assert store.job("stopped").state == "stopped"
    run = tmp_path / "runs" / "killed"
    assert state_for_exit(137, run, False) == "lost"  # 128 + 9 through a shell (Ray)
    assert state_for_exit(1, run, False) == "failed"
    assert state_for_exit(None, run, False) == "lost"


# ---- item 13: start's own fields ----------------------------------------------------------


def test_item13_nproc_is_a_strict_integer_and_dataset_path_must_exist(tmp_path: Path) -> None:
    state = tmp_path / "state"
    raw = _data_in(state)
    with TestClient(_app(state)) as http:
        for nproc in (True, "2", 2.0):
            answer = http.post(START, json={"config": raw, "nproc": nproc})
            assert answer.status_code == 422, (nproc, answer.text)
            assert answer.json()["detail"][0].startswith("nproc: "), answer.text
        missing = state / "data" / "nope.jsonl"
        answer = http.post(START, json={"config": raw, "dataset_path": str(missing)})
        assert answer.status_code == 422
        assert answer.json()["detail"] == [f"dataset_path: {missing}: no such file or directory"]
        assert http.post(START, json={"config": raw, "nproc": 2}).status_code == 201


# ---- item 14: every path a client can name ------------------------------------------------


def _leaves(model: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, annotation) of every field of a config model, sections walked into."""
    from pydantic import BaseModel

    from kiln.config.base import union_members

    found = []
    for name, field in model.model_fields.items():
        sections = []
        for member in union_members(field.annotation):
            args = typing.get_args(member) if typing.get_origin(member) in (list, dict) else ()
            for one in (member, *[m for a in args for m in union_members(a)]):
                if isinstance(one, type) and issubclass(one, BaseModel):
                    sections.append(one)
        if sections:
            for section in sections:
                found += _leaves(section, f"{prefix}{name}.")
        else:
            found.append((f"{prefix}{name}", field.annotation))
    return found


def test_item14_every_string_field_of_a_run_config_is_classified() -> None:
    """A new field that holds a string (a path, maybe) fails here until kiln/serve/confine.py
    confines it or says it names no file."""
    from kiln.config import RunConfig
    from kiln.serve.confine import NOT_PATHS, PATH_KEYS

    def holds_text(annotation: Any) -> bool:  # str, Any, or a container or union of them
        if annotation is str or annotation is Any:
            return True
        if typing.get_origin(annotation) is typing.Literal:
            return False
        return any(holds_text(a) for a in typing.get_args(annotation))

    strings = {key for key, annotation in _leaves(RunConfig) if holds_text(annotation)}
    assert strings - set(PATH_KEYS) - NOT_PATHS == set()
    assert (set(PATH_KEYS) | NOT_PATHS) - strings == set()  # no stale entry
    assert len(strings) >= 45


def _escapes(state: Path, outside: Path, key: str) -> dict[str, str]:
    """Ways out for `key`: an absolute path outside, a `..` escape from its base, a symlink
    in its base (or the state directory) pointing out, the server user's home."""
    name = WRITE_KEYS.get(key, "x.jsonl")
    base = {"data.cache_dir": state / "cache"}.get(key, state)  # (a run dir: not made yet)
    link = base / "link"
    if not link.is_symlink():
        base.mkdir(parents=True, exist_ok=True)
        link.symlink_to(outside, target_is_directory=True)
    relative = key in READ_KEYS or key == "data.cache_dir"
    return {
        "absolute": str(outside / name),
        "dotdot": "../" * 4 + f"outside/{name}",
        "symlink": f"link/{name}" if relative else str(link / name),
        "home": f"~/{name}",
    }


WRITE_KEYS = {
    "data.cache_dir": "cache",
    "log.tensorboard.log_dir": "tb",
    "log.mlflow.tracking_uri": "mlflow.db",
}
READ_KEYS = ("data.train", "data.val", "model.name_or_path", "tokenizer.name_or_path")


def _set(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    section, _, leaf = key.partition(".")
    out = json.loads(json.dumps(raw))
    if section == "log" and leaf.count("."):
        sub, leaf = leaf.split(".")
        out["log"].setdefault(sub, {})[leaf] = value
    elif key == "model.name_or_path":
        out["model"] = {"name_or_path": value}
    else:
        out.setdefault(section, {})[leaf] = value
    return out


def test_item14_no_key_reads_or_writes_outside_the_state_dir(tmp_path: Path) -> None:
    state, outside = tmp_path / "state", tmp_path / "outside"
    outside.mkdir()
    write_jsonl(outside / "x.jsonl", make_rows(4))
    raw = _data_in(state)
    refused = []
    with TestClient(_app(state)) as http:
        for key in (*READ_KEYS, *WRITE_KEYS):
            for how, value in _escapes(state, outside, key).items():
                for route in (START, "/api/training/configs"):
                    answer = http.post(route, json={"name": "n", "config": _set(raw, key, value)})
                    assert answer.status_code == 422, (key, how, route, answer.text)
                    assert any(line.startswith(f"{key}") for line in answer.json()["detail"])
                refused.append((key, how))
        for uri in ("http://attacker.example/", f"file://{outside}/m", f"sqlite:///{outside}/m.db"):
            answer = http.post(START, json={"config": _set(raw, "log.mlflow.tracking_uri", uri)})
            assert answer.status_code == 422, uri
        twilio = {"kind": "twilio", "api_url": "https://attacker.example"}
        answer = http.post(START, json={"config": {**raw, "notify": {"senders": [twilio]}}})
        assert answer.json()["detail"][0].startswith("notify.senders.0.api_url: ")
        hub = http.post(START, json={"config": _set(raw, "data.train", "hf:someone/data")})
        assert "--allow-hub" in hub.json()["detail"][0]
        assert not any(outside.glob("**/*.db"))
        assert not (outside / "cache").exists()
    assert len(refused) == 7 * 4


def test_item14_paths_inside_are_made_absolute_and_allow_read_opens_reading_only(
    tmp_path: Path,
) -> None:
    state, corpora = tmp_path / "state", tmp_path / "corpora"
    corpora.mkdir()
    write_jsonl(corpora / "x.jsonl", make_rows(8))
    raw = _data_in(state)
    raw["data"].pop("cache_dir", None)
    raw["data"]["val"] = "data/val.jsonl"  # relative: to the state directory
    raw["log"] = {**raw["log"], "tensorboard": {"log_dir": "tb"}}
    with TestClient(_app(state, allow_read=(corpora,))) as http:
        job = http.post(START, json={"config": raw, "dataset_path": str(corpora / "*.jsonl")})
        assert job.status_code == 201, job.text
        ran = job.json()
        config = http.get("/api/training/jobs").json()[0]
        assert config["id"] == ran["id"]
        stored = http.app.state.store.job(ran["id"]).config
        run_dir = (state / "runs" / ran["id"]).resolve()
        assert stored["data"]["train"] == str(corpora.resolve() / "*.jsonl")
        assert stored["data"]["val"] == str((state / "data" / "val.jsonl").resolve())
        assert stored["data"]["cache_dir"] == str(state.resolve() / "cache")
        assert stored["log"]["tensorboard"]["log_dir"] == str(run_dir / "tb")
        cache = _set(raw, "data.cache_dir", str(corpora / "cache"))  # readable, not writable
        answer = http.post(START, json={"config": cache})
        assert answer.status_code == 422
        assert answer.json()["detail"][0].startswith("data.cache_dir: ")


def test_item14_a_job_never_sees_the_servers_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's config may name any environment variable as a notifier's token_env: the
    server's own credentials are not in a job's environment to be sent on."""
    from types import SimpleNamespace

    from kiln.serve.executor import LocalExecutor

    monkeypatch.setenv("KILN_SERVE_TOKEN", "admin-secret")
    monkeypatch.setenv("KILN_SERVE_READ_TOKEN", "read-secret")
    monkeypatch.setenv("KILN_TEST_KEPT", "kept")
    executor = LocalExecutor.__new__(LocalExecutor)  # the submit step alone: no store, no queue
    executor.procs = {}
    code = "import json, os; print(json.dumps({k: os.environ.get(k) for k in "
    code += "('KILN_SERVE_TOKEN', 'KILN_SERVE_READ_TOKEN', 'KILN_TEST_KEPT')}))"
    log = tmp_path / "job.log"
    job = typing.cast(JobRow, SimpleNamespace(id="j1", attempt=1))
    executor._submit(job, [sys.executable, "-c", code], log)
    assert executor.procs["j1"].wait(timeout=60) == 0
    seen = json.loads(log.read_text().splitlines()[-1])
    assert seen == {
        "KILN_SERVE_TOKEN": None,
        "KILN_SERVE_READ_TOKEN": None,
        "KILN_TEST_KEPT": "kept",
    }


def test_item14_each_mixture_source_is_confined_by_its_index(tmp_path: Path) -> None:
    """data.sources is a list of sections: each source's path is read-confined and named
    data.sources.<k>.path; a name is left alone; the client's config is not changed."""
    from kiln.serve.confine import Confinement, ConfinementError

    state, outside = tmp_path / "state", tmp_path / "outside"
    (state / "data").mkdir(parents=True)
    outside.mkdir()
    for where in (state / "data", outside):
        write_jsonl(where / "a.jsonl", make_rows(2))
    inside = {"path": "data/a.jsonl", "weight": 2.0, "name": "../../x"}
    config = {"data": {"sources": [inside, {"path": str(outside / "a.jsonl")}]}}
    confinement = Confinement(state)
    with pytest.raises(ConfinementError) as refused:
        confinement.confine(config, state / "runs" / "r")
    assert refused.value.problems == [
        f"data.sources.1.path: {outside / 'a.jsonl'} is outside the server's state directory: "
        "kiln serve reads only there"
    ]
    config["data"]["sources"].pop()
    confined = confinement.confine(config, state / "runs" / "r")
    source = confined["data"]["sources"][0]
    assert source == {**inside, "path": str((state / "data" / "a.jsonl").resolve())}
    assert config["data"]["sources"][0]["path"] == "data/a.jsonl"  # the caller's, as it was
    missing = {"data": {"sources": [{"path": "data/none.jsonl"}]}}
    with pytest.raises(ConfinementError, match=r"^data\.sources\.0\.path: data/none\.jsonl: no"):
        confinement.confine(missing, state / "runs" / "r")


def test_what_a_config_names_is_checked_as_kiln_train_checks_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 29 item 1: beyond confinement (which finds a missing path), the REST API refuses
    what `kiln train` refuses before torch loads: a model directory without config.json and an
    extra the config needs that is not installed, every problem in one 422, on both routes."""
    state = tmp_path / "state"
    raw = _data_in(state)
    (state / "models" / "empty").mkdir(parents=True)
    raw["model"] = {"name_or_path": str(state / "models" / "empty")}
    raw["lora"] = {"enabled": True}
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with TestClient(_app(state)) as http:
        for route in (START, "/api/training/configs"):
            answer = http.post(route, json={"name": "n", "config": raw})
            assert answer.status_code == 422, (route, answer.text)
            detail = answer.json()["detail"]
            assert [line.split(":")[0] for line in detail] == ["model.name_or_path", "lora.enabled"]
            assert "config.json" in detail[0], detail
            assert "kiln[lora]" in detail[1], detail
        assert http.get("/api/training/jobs").json() == []
