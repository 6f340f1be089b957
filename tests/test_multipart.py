"""The in-memory multipart reader against bodies built by httpx, the client most users' tools resemble."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mnist_service.errors import BadRequest
from mnist_service.serving.multipart import boundary_of, parse_parts


def _encode(files: list[tuple[str, tuple[str, bytes]]], data: dict[str, str] | None = None) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.read(), request.headers["content-type"]


def _parse(body: bytes, content_type: str, max_parts: int = 100):
    return parse_parts(body, boundary_of(content_type), max_parts)


# Contents that look like the format itself: CRLFs, dashes, a boundary-like line, nothing at all.
_tricky = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from([b"\r\n", b"--", b"\r\n--", b"\r\n\r\n", b"x", b"--boundary"]), max_size=12).map(b"".join),
)


@settings(max_examples=200, deadline=None)
@given(contents=st.lists(_tricky, min_size=1, max_size=5))
def test_every_file_comes_back_byte_for_byte(contents: list[bytes]) -> None:
    files = [("files", (f"{i}.png", c)) for i, c in enumerate(contents)]
    parts = _parse(*_encode(files))
    assert [(p.name, p.filename, p.data) for p in parts] == [
        ("files", f"{i}.png", c) for i, c in enumerate(contents)
    ]


def test_text_fields_have_no_filename_and_quoted_names_survive() -> None:
    body, content_type = _encode([("file", ('my "digit".png', b"PNG"))], data={"note": "hello"})
    parts = {p.name: p for p in _parse(body, content_type)}
    assert parts["note"].filename is None and parts["note"].data == b"hello"
    assert parts["file"].data == b"PNG" and parts["file"].filename is not None


def test_a_preamble_and_an_epilogue_are_ignored() -> None:
    body = (
        b"ignore me\r\n--b\r\n"
        b'Content-Disposition: form-data; name="f"; filename="a"\r\n\r\nDATA\r\n--b--\r\nafter'
    )
    [part] = _parse(body, "multipart/form-data; boundary=b")
    assert part.data == b"DATA"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"no boundary in here", "does not contain its boundary"),
        (b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\nDATA', "without its closing boundary"),
        (b"--b\r\nContent-Type: image/png\r\n\r\nDATA\r\n--b--", "no Content-Disposition"),
        (b'--b\r\nContent-Disposition: attachment; name="f"\r\n\r\nx\r\n--b--', "must be form-data"),
        (b'--bjunk\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n--b--', "malformed after a boundary"),
        (b'--b\r\nContent-Disposition: form-data; name="f"\r\nDATA\r\n--b--', "no blank line"),
    ],
)
def test_malformed_bodies_are_a_400_that_says_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as raised:
        _parse(body, "multipart/form-data; boundary=b")
    assert message in raised.value.detail


def test_too_many_parts_stop_the_parse() -> None:
    body, content_type = _encode([("files", (f"{i}", b"x")) for i in range(5)])
    assert len(_parse(body, content_type, max_parts=5)) == 5
    with pytest.raises(BadRequest, match="too many parts"):
        _parse(body, content_type, max_parts=4)


@pytest.mark.parametrize(
    "content_type", ["multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; charset=utf-8"]
)
def test_a_missing_boundary_parameter_is_a_400(content_type: str) -> None:
    with pytest.raises(BadRequest, match="no valid boundary"):
        boundary_of(content_type)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"--b", b"--b--", b"\r\n", b"\r\n\r\n", b"Content-Disposition: form-data; name=\"f\"",
                         b"; filename=\"x\"", b":", b"x", b" ", b"\xff"]),
        max_size=30,
    ).map(b"".join)
)
def test_any_body_parses_or_is_a_400(body: bytes) -> None:
    try:
        parts = _parse(body, "multipart/form-data; boundary=b", max_parts=10)
    except BadRequest:
        return
    assert all(isinstance(p.data, bytes) and isinstance(p.name, str) for p in parts)
