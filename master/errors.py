"""The master's errors: members of the objfs family that also carry an HTTP status.

Every failure a caller of the master API can cause is a ``MasterError`` with a status (4xx for
bad input, 5xx for the master's or the origin's trouble), a short machine-readable ``code`` and
a one-line message. The HTTP layer turns it into ``{"error": message, "code": code}`` in one
place (``master.app``); the Python client raises the same class from such an answer, so the
CLI prints the master's own sentence.
"""

from __future__ import annotations

import errno

from objfs.errors import ObjfsError


class MasterError(ObjfsError):
    """An error with an HTTP status and a stable ``code``."""

    status: int = 500
    code: str = "internal"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 errno_value: int | None = None) -> None:
        super().__init__(message, errno_value=errno_value)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class BadRequest(MasterError):
    """Malformed input: JSON, URL, field types or values."""

    status = 400
    code = "bad_request"
    errno = errno.EINVAL


class NotFound(MasterError):
    """An unknown job id, or a source path with no object at the origin."""

    status = 404
    code = "not_found"
    errno = errno.ENOENT


class Conflict(MasterError):
    """Valid input the cluster's state refuses: no member mounts the data, several groups
    do and none was chosen, mixed extent sizes, cancelling a finished job."""

    status = 409
    code = "conflict"


class OriginFailed(MasterError):
    """The origin could not be listed or read (after retries)."""

    status = 502
    code = "origin_error"


class Unauthorized(MasterError):
    """The master refused the request's signature (raised by the client on a 401)."""

    status = 401
    code = "unauthorized"
    errno = errno.EACCES


class MasterUnreachable(MasterError):
    """No HTTP answer from the master (raised by clients)."""

    status = 503
    code = "unreachable"
    errno = errno.EHOSTUNREACH
