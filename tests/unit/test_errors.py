"""Unit tests of ``objfs.errors``: how origin answers are classified and what errno they become."""

from __future__ import annotations

import errno

import pytest

from objfs.errors import (
    AccessDenied,
    BucketNotFound,
    ConfigError,
    InvalidArgument,
    NotFound,
    ObjfsError,
    OriginError,
    OriginUnreachable,
    ReadOnly,
    StaleObject,
    classify_origin_error,
    errno_of,
)


@pytest.mark.parametrize(("status", "code", "expected_errno", "retryable"), [
    (403, None, errno.EACCES, False),
    (403, "AccessDenied", errno.EACCES, False),
    (403, "InvalidAccessKeyId", errno.EACCES, False),
    (403, "SignatureDoesNotMatch", errno.EACCES, False),
    (400, "ExpiredToken", errno.EACCES, False),
    (404, None, errno.ENOENT, False),
    (404, "NoSuchKey", errno.ENOENT, False),
    (412, None, errno.ESTALE, False),
    (412, "PreconditionFailed", errno.ESTALE, False),
    (500, None, errno.EIO, True),
    (500, "InternalError", errno.EIO, True),
    (502, None, errno.EIO, True),
    (503, None, errno.EIO, True),
    (503, "SlowDown", errno.EIO, True),
    (429, None, errno.EIO, True),
    (400, "RequestTimeout", errno.EIO, True),
    (400, "SlowDown", errno.EIO, True),
    (400, None, errno.EIO, False),
    (400, "InvalidArgument", errno.EIO, False),
    (400, "MalformedXML", errno.EIO, False),
    (409, "Conflict", errno.EIO, False),
])
def test_classify_origin_error(status: int, code: str | None, expected_errno: int,
                               retryable: bool) -> None:
    err = classify_origin_error(status, code, "the message")
    assert type(err) is OriginError
    assert (err.errno, err.retryable) == (expected_errno, retryable)
    assert (err.status, err.code) == (status, code or "")
    assert errno_of(err) == expected_errno
    assert "the message" in str(err) and str(status) in str(err)
    if code:
        assert code in str(err)


@pytest.mark.parametrize("status", [404, 400, 403])
def test_no_such_bucket_is_its_own_error(status: int) -> None:
    err = classify_origin_error(status, "NoSuchBucket", "gone")
    assert isinstance(err, BucketNotFound)
    assert err.errno == errno.ENOENT
    assert not err.retryable


def test_classified_errors_do_not_share_errno_state() -> None:
    # errno is set per instance on some branches: it must not leak into the class.
    classify_origin_error(412, None, "")
    classify_origin_error(403, None, "")
    assert OriginError("x").errno == errno.EIO
    assert classify_origin_error(500, None, "").errno == errno.EIO


@pytest.mark.parametrize(("exc", "expected"), [
    (NotFound("x"), errno.ENOENT),
    (AccessDenied("x"), errno.EACCES),
    (StaleObject("x"), errno.ESTALE),
    (ReadOnly("x"), errno.EROFS),
    (InvalidArgument("x"), errno.EINVAL),
    (ConfigError("x"), errno.EINVAL),
    (OriginError("x"), errno.EIO),
    (OriginUnreachable("x"), errno.EIO),
    (BucketNotFound("x"), errno.ENOENT),
    (ObjfsError("x"), errno.EIO),
    (ObjfsError("x", errno_value=errno.ENOTDIR), errno.ENOTDIR),
    (NotFound("x", errno_value=errno.EISDIR), errno.EISDIR),
    (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
    (FileNotFoundError(errno.ENOENT, "x"), errno.ENOENT),
    (OSError("no errno"), errno.EIO),
    (TimeoutError(), errno.EIO),
    (ValueError("x"), errno.EIO),
    (KeyError("x"), errno.EIO),
    (RuntimeError(), errno.EIO),
])
def test_errno_of(exc: BaseException, expected: int) -> None:
    assert errno_of(exc) == expected


def test_errno_value_overrides_only_that_instance() -> None:
    NotFound("a", errno_value=errno.EISDIR)
    assert NotFound("b").errno == errno.ENOENT
