"""Generated hostile REST requests (issue 26's fuzz acceptance): every route, through its own
OpenAPI schema (schemathesis, non-ASCII values included) with bad headers added, and raw
bodies no schema describes: deep, huge, not JSON, not UTF-8, any content type. No answer may
be a server error; every error is JSON with a `detail`. Bounded: about 30 s on 2 cores."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kiln.serve.app import Settings, create_app  # noqa: E402
from kiln.serve.store import JobRow  # noqa: E402

pytestmark = pytest.mark.slow
TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# No shrinking: a failure prints its example at once instead of minutes later.
FAST = settings(
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)

# Header values as a client could send them: latin-1 text (what HTTP carries), made-up
# numbers, and the usual suspects.
_header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40).map(
    str.strip
)
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "Last-Event-ID": st.one_of(_header_text, st.sampled_from(["1.5", "-1", "1e9", "9" * 5000])),
        "Content-Type": st.one_of(
            _header_text,
            st.sampled_from(
                [
                    "application/json",
                    "application/json; charset=latin-1",
                    "text/plain",
                    "multipart/form-data; boundary=x",
                    "application/x-www-form-urlencoded",
                ]
            ),
        ),
        "Authorization": st.one_of(
            _header_text,
            st.sampled_from(
                ["Bearer", "Bearer ", f"bearer {TOKEN}", f"Basic {TOKEN}", f"Bearer {TOKEN}x"]
            ),
        ),
        "Range": st.sampled_from(["bytes=5-1", "bytes=-0", "bytes=x", "bytes=0-"]),
    },
)


def _app(tmp: Path) -> Any:
    """A dry-run server with one ended job whose files hold what a run can leave behind."""
    app = create_app(Settings(tmp / "state", token=TOKEN, dry_run=True))
    run = tmp / "state" / "runs" / "ended"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "split": "train", "loss": NaN}\n{"step": "x"}\n{"step": 2, "loss": null}\n'
    )
    (run / "status.json").write_text('{"format": 1, "state": "finished", "step": 2}')
    app.state.store.add_job(
        JobRow(
            id="ended",
            name="ended",
            config={},
            run_dir=str(run),
            state="succeeded",
            attempt=1,
            resume=False,
            created=time.time(),
        )
    )
    return app


def _no_server_error(response: Any, what: object) -> None:
    assert response.status_code < 500, (what, response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert "detail" in response.json(), (what, response.text[:300])


def test_every_route_with_bad_headers_answers_without_a_server_error(tmp_path: Path) -> None:
    app = _app(tmp_path)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    routes = []
    for result in schema.get_all_operations():
        operation = result.ok()
        routes.append(operation.label)

        @given(case=operation.as_strategy(), headers=HEADERS)
        @settings(FAST, max_examples=8)
        def check(case: Any, headers: dict[str, str]) -> None:
            if case.path_parameters and "job_id" in case.path_parameters and headers:
                case.path_parameters["job_id"] = "ended"  # a real job: its stream ends
            merged = {**AUTH, **headers} if "Authorization" not in headers else headers
            _no_server_error(case.call(headers=merged), (case.method, case.formatted_path))

        check()
    assert len(routes) >= 17, routes


def _nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
BODIES = st.one_of(
    st.integers(1, 5000).map(lambda d: f'{{"name": "n", "config": {_nested(d)}}}'.encode()),
    st.integers(1, 5000).map(lambda d: ("[" * d + "]" * d).encode()),
    st.just(b'{"name": "n", "config": {"x": "' + b"\xc3\xa9" * (1 << 19) + b'"}}'),  # > 1 MiB
    st.binary(max_size=200),
    _json_values.map(lambda v: json.dumps({"name": "n", "config": v}).encode()),
    _json_values.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8")),
    st.dictionaries(st.text(), _json_values, max_size=5).map(
        lambda v: json.dumps({"config": {"model": v, "data": v}, "dataset_path": str(v)}).encode()
    ),
)
POSTS = [
    "/api/training/configs",
    "/api/training/configs/explain",
    "/api/training/jobs/start",
    "/api/training/jobs/ended/stop",
    "/api/training/jobs/ended/resume",
]


@given(body=BODIES, route=st.sampled_from(POSTS), headers=HEADERS)
@settings(FAST, max_examples=300)
def test_raw_bodies_deep_huge_and_not_json_answer_without_a_server_error(
    tmp_path_factory: pytest.TempPathFactory, body: bytes, route: str, headers: dict[str, str]
) -> None:
    if "http" not in _CLIENT:  # one app for every example (a dry run: no lifespan needed)
        _CLIENT["http"] = TestClient(_app(tmp_path_factory.mktemp("fuzz")))
    sent = {**AUTH, "Content-Type": "application/json", **headers}
    sent = {k: v.encode("latin-1") for k, v in sent.items()}  # as HTTP carries them
    answer = _CLIENT["http"].post(route, content=body, headers=sent)
    _no_server_error(answer, (route, body[:80]))


_CLIENT: dict[str, TestClient] = {}
