"""Unit tests of what cluster members share: the secret file and request signatures
(``objfs.cluster``), and the auth middleware on a real aiohttp app."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from objfs.cluster import (DATE_HEADER, SIGNATURE_HEADER, auth_middleware, load_cluster_secret,
                           sign, verify)
from objfs.errors import ConfigError

SECRET = b"0123456789abcdef0123456789abcdef"
PATH = "/v1/pages?bucket=b&key=a%20b&etag=e&size=10&first=0&count=1"
NOW = 1_800_000_000.0


# ---- signatures ----------------------------------------------------------------------------------

def test_a_signed_request_verifies() -> None:
    headers = sign(SECRET, "GET", PATH, now=NOW)
    assert set(headers) == {DATE_HEADER, SIGNATURE_HEADER}
    assert verify(SECRET, "GET", PATH, headers, now=NOW + 10) is None
    assert verify(SECRET, "get", PATH, headers, now=NOW) is None  # methods are upper-cased


@pytest.mark.parametrize("change, reason", [
    (lambda h: {}, "no signature"),
    (lambda h: {DATE_HEADER: h[DATE_HEADER]}, "no signature"),
    (lambda h: {SIGNATURE_HEADER: h[SIGNATURE_HEADER]}, "no signature"),
    (lambda h: {**h, SIGNATURE_HEADER: "0" * 64}, "wrong signature"),
    (lambda h: {**h, DATE_HEADER: str(int(NOW) + 1)}, "wrong signature"),  # date is signed
])
def test_missing_or_tampered_headers_are_refused(change, reason) -> None:
    headers = change(sign(SECRET, "GET", PATH, now=NOW))
    assert verify(SECRET, "GET", PATH, headers, now=NOW) == reason


def test_wrong_secret_tampered_path_or_method_are_refused() -> None:
    headers = sign(SECRET, "GET", PATH, now=NOW)
    assert verify(b"another secret of enough bytes", "GET", PATH, headers, now=NOW) == \
        "wrong signature"
    assert verify(SECRET, "GET", PATH.replace("first=0", "first=8"), headers, now=NOW) == \
        "wrong signature"
    assert verify(SECRET, "GET", PATH.replace("bucket=b", "bucket=c"), headers, now=NOW) == \
        "wrong signature"
    assert verify(SECRET, "POST", PATH, headers, now=NOW) == "wrong signature"


def test_body_is_signed() -> None:
    headers = sign(SECRET, "POST", "/x", body=b"hello", now=NOW)
    assert verify(SECRET, "POST", "/x", headers, body=b"hello", now=NOW) is None
    assert verify(SECRET, "POST", "/x", headers, body=b"hellO", now=NOW) == "wrong signature"


def test_stale_and_future_timestamps_are_refused() -> None:
    headers = sign(SECRET, "GET", PATH, now=NOW)
    assert verify(SECRET, "GET", PATH, headers, now=NOW + 299) is None
    assert verify(SECRET, "GET", PATH, headers, now=NOW + 301).startswith("stale")
    assert verify(SECRET, "GET", PATH, headers, now=NOW - 301).startswith("stale")


# ---- the secret file -----------------------------------------------------------------------------

def write_secret(path: Path, data: bytes, mode: int) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def test_secret_file_is_read_and_stripped(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "s", b"  " + SECRET + b"\n", 0o600)
    assert load_cluster_secret(path) == SECRET
    assert load_cluster_secret(write_secret(tmp_path / "r", SECRET, 0o400)) == SECRET


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666, 0o610])
def test_secret_file_accessible_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = write_secret(tmp_path / "s", SECRET, mode)
    with pytest.raises(ConfigError) as info:
        load_cluster_secret(path)
    message = str(info.value)
    assert "accessible by other users" in message and f"chmod 600 {path}" in message
    assert "\n" not in message


def test_missing_short_or_odd_secret_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_cluster_secret(tmp_path / "nope")
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        load_cluster_secret(write_secret(tmp_path / "short", b"tooshort", 0o600))
    with pytest.raises(ConfigError, match="not a regular file"):
        load_cluster_secret(tmp_path)


# ---- the middleware ------------------------------------------------------------------------------

def test_middleware_answers_401_without_calling_the_handler() -> None:
    refused: list[tuple[str, str]] = []
    calls: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(request.raw_path)
        return web.Response(body=b"PAGE DATA")

    async def main() -> None:
        app = web.Application(middlewares=[auth_middleware(
            SECRET, on_refused=lambda remote, reason: refused.append((remote, reason)))])
        app.router.add_get("/v1/pages", handler)
        async with TestClient(TestServer(app)) as client:
            ok = await client.get(PATH, headers=sign(SECRET, "GET", PATH))
            assert ok.status == 200 and await ok.read() == b"PAGE DATA"
            for headers in ({}, sign(b"wrong secret, long enough!", "GET", PATH),
                            sign(SECRET, "GET", PATH, now=NOW - 10_000)):
                resp = await client.get(PATH, headers=headers)
                assert resp.status == 401
                assert await resp.json() == {"error": "unauthorized"}
    asyncio.run(main())
    assert calls == [PATH]
    assert [reason.split(" ")[0] for _, reason in refused] == ["no", "wrong", "stale"]
