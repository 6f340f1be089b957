"""Property-based fuzzing of every operation in our own /openapi.json, in-process over ASGI.

schemathesis generates requests from the schema, both valid ones and ones the schema forbids,
sends them to a started app and checks: no 5xx, every status code and content type is declared,
and every body and header conforms to what the schema declares for its status.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from mnist_service.serving.api import create_app
from mnist_service.settings import Settings

pytestmark = pytest.mark.slow

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
# The schema needs no model (only serving does), so the operations are known at collection time.
OPERATIONS = [
    (method.upper(), path)
    for path, methods in create_app(Settings()).openapi()["paths"].items()
    for method in methods
]


@pytest.fixture(scope="module")
def api_schema(model_path: Path) -> OpenApiSchema:
    # schemathesis runs the app's lifespan (model loaded and warmed) on its first call and keeps
    # it running, so every generated request meets a ready server. Not schema.parametrize() with
    # from_fixture: its lazy loader writes a pytest-private attribute that pytest 9 no longer has.
    app = create_app(Settings(model_path=model_path, max_batch_delay_ms=1.0, request_timeout_s=10.0))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_the_schema_has_every_operation(api_schema: OpenApiSchema) -> None:
    loaded = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert loaded == set(OPERATIONS)
    assert len(loaded) >= 15  # the test below must not silently cover nothing


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_every_operation_conforms_to_its_schema(api_schema: OpenApiSchema, method: str, path: str) -> None:
    operation = api_schema[path][method]
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
    )

    @given(case=cases)
    @settings(
        max_examples=40,
        deadline=None,
        derandomize=True,  # the same cases on every run: a red CI run replays locally
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=CHECKS)

    fuzz()
