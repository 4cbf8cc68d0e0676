"""One exception family for the whole daemon, each member carrying its errno.

Every failure that can reach the filesystem boundary is an ``ObjfsError`` (or is turned into
one by ``errno_of``); the FUSE adapter converts it to ``FUSEError(errno)`` in one place and maps
anything unexpected to EIO after logging it. Origin failures are classified here, once, from the
HTTP status and S3 error code, so the retry layer and the errno mapping agree on what a
failure means.
"""

from __future__ import annotations

import errno
import logging

log = logging.getLogger(__name__)


class ObjfsError(Exception):
    """Base of all objfs errors. ``errno`` is what a POSIX caller sees."""

    errno: int = errno.EIO
    log_level: int = logging.WARNING

    def __init__(self, message: str = "", *, errno_value: int | None = None) -> None:
        super().__init__(message)
        if errno_value is not None:
            self.errno = errno_value


class NotFound(ObjfsError):
    errno = errno.ENOENT
    log_level = logging.DEBUG


class AccessDenied(ObjfsError):
    errno = errno.EACCES


class StaleObject(ObjfsError):
    """The object changed at the origin under an open handle (412 on If-Match)."""

    errno = errno.ESTALE


class ReadOnly(ObjfsError):
    errno = errno.EROFS
    log_level = logging.DEBUG


class InvalidArgument(ObjfsError):
    errno = errno.EINVAL


class OriginError(ObjfsError):
    """The origin failed (after retries) or answered something we cannot use."""

    errno = errno.EIO
    log_level = logging.ERROR

    def __init__(self, message: str = "", *, status: int | None = None, code: str | None = None,
                 retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retryable = retryable


class OriginUnreachable(OriginError):
    """No HTTP answer at all: connection refused/reset, DNS failure, timeout."""


class BucketNotFound(OriginError):
    errno = errno.ENOENT


class ConfigError(ObjfsError):
    """Bad user input, found at the edge (CLI/config) before anything starts."""

    errno = errno.EINVAL


# S3 error codes that are worth another attempt even though the status may be 4xx.
_RETRYABLE_CODES = frozenset({
    "SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
})
_DENIED_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
    "ExpiredToken", "AllAccessDisabled", "InvalidSecurity",
})


def classify_origin_error(status: int, code: str | None, message: str) -> OriginError:
    """Turn an S3 error answer (HTTP status + <Code>) into the typed error every caller sees."""
    code = code or ""
    text = f"{status} {code}: {message}".strip() if code else f"HTTP {status}: {message}".strip()
    if code == "NoSuchBucket":
        err: OriginError = BucketNotFound(text, status=status, code=code)
    elif status == 412 or code == "PreconditionFailed":
        err = OriginError(text, status=status, code=code)
        err.errno = errno.ESTALE
    elif status == 404 or code in ("NoSuchKey", "NotFound"):
        err = OriginError(text, status=status, code=code)
        err.errno = errno.ENOENT
    elif status == 403 or code in _DENIED_CODES:
        err = OriginError(text, status=status, code=code)
        err.errno = errno.EACCES
    elif status >= 500 or status == 429 or code in _RETRYABLE_CODES:
        err = OriginError(text, status=status, code=code, retryable=True)
    elif status == 416:
        err = OriginError(text, status=status, code=code)
        err.errno = errno.EINVAL
    else:
        err = OriginError(text, status=status, code=code)
    return err


class LocalDiskError(ObjfsError):
    """The local disk failed an operation objfs needed (staging, the spool): its errno is
    the disk's (ENOSPC, EFBIG, EDQUOT, EIO...)."""


def from_oserror(exc: OSError, what: str) -> ObjfsError:
    """An OSError of local I/O as an ObjfsError with the same errno (EIO if it has none),
    so it reaches the application as itself, logged in one line, not as a traceback."""
    return LocalDiskError(f"{what}: {exc.strerror or exc}", errno_value=exc.errno or errno.EIO)


def errno_of(exc: BaseException) -> int:
    """The errno a POSIX caller sees for ``exc``; EIO for anything unexpected."""
    if isinstance(exc, ObjfsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
