"""The API against its own OpenAPI schema: schemathesis generates requests for every route
(the event stream excluded) on an app whose executor never starts a job (dry run). No
response may be a server error, and every response must match the schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow

from schemathesis.checks import positive_data_acceptance  # noqa: E402

TOKEN = "fuzz-token"


def test_every_route_answers_within_its_schema(tmp_path: Path) -> None:
    from kiln.serve.app import Settings, create_app

    app = create_app(Settings(tmp_path, token=TOKEN, dry_run=True))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema = schema.exclude(path_regex=r".*/events$")  # a stream: no end to validate
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()
        checked.append(operation.label)

        @given(case=operation.as_strategy())
        @settings(
            max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case: object) -> None:
            # A schema-valid config may still break a rule across keys (warmup >= max_steps,
            # a data file that is not there): its 422 is right, so that check is left out.
            case.call_and_validate(
                headers={"Authorization": f"Bearer {TOKEN}"},
                excluded_checks=[positive_data_acceptance],
            )

        check()
    assert len(checked) >= 17, checked  # every route of the contract, and the extras
