"""The multipart uploads this mount started and has not finished, written down in the cache dir.

Why: an unfinished multipart upload is invisible (nothing partial is ever published), but its
parts are stored, and billed, until someone aborts it. The writer aborts on every failure it
sees; what it cannot see is its own death (kill -9, the OOM killer, a crash). So each upload id
is recorded when CreateMultipartUpload answers and crossed out when the upload completes or is
aborted, and a mount starting on the same cache dir aborts whatever is left. Only uploads this
cache dir started are touched: other hosts writing under the same prefix have uploads in
progress too, and the bucket's upload listing cannot tell theirs from ours.

One small JSON file per upload under ``CACHE_DIR/uploads``, written to a temporary name and
renamed, so a record is whole or absent. Records are written on the event loop (the store's
multipart calls run there), so there is no fsync: a record survives the process, not
necessarily a power cut, and a lost record costs storage until the bucket's lifecycle rule
(AbortIncompleteMultipartUpload) removes it. The cache dir's lock makes the ledger this
daemon's alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class PendingUpload:
    bucket: str
    key: str
    upload_id: str
    started_at: float  # wall clock, seconds


class UploadLedger:
    """Records of multipart uploads in progress. Never raises on disk trouble: the upload
    matters more than its record (a failed write is logged once and counted)."""

    def __init__(self, directory: Path, bucket: str, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.bucket = bucket
        self._clock = clock
        self._warned = threading.Event()
        self.write_errors = 0
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, upload_id: str) -> Path:
        digest = hashlib.sha256(upload_id.encode()).hexdigest()[:40]
        return self.directory / f"{digest}.json"

    def started(self, key: str, upload_id: str) -> None:
        record = {"bucket": self.bucket, "key": key, "upload_id": upload_id,
                  "started_at": self._clock()}
        path = self._path(upload_id)
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        except OSError as exc:
            self._trouble(f"could not record the multipart upload of {key}", exc)

    def ended(self, upload_id: str) -> None:
        try:
            self._path(upload_id).unlink(missing_ok=True)
        except OSError as exc:
            self._trouble("could not cross out a finished multipart upload", exc)

    def pending(self) -> list[PendingUpload]:
        """Uploads recorded and not crossed out, oldest first. Unreadable records (a crash
        between write and rename leaves only a .tmp) are removed."""
        found: list[PendingUpload] = []
        for path in self.directory.iterdir():
            if path.suffix == ".tmp":
                path.unlink(missing_ok=True)
                continue
            try:
                raw = json.loads(path.read_text())
                found.append(PendingUpload(str(raw["bucket"]), str(raw["key"]),
                                           str(raw["upload_id"]), float(raw["started_at"])))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("removing unreadable upload record %s: %s", path, exc)
                path.unlink(missing_ok=True)
        return sorted(found, key=lambda p: p.started_at)

    def _trouble(self, what: str, exc: OSError) -> None:
        self.write_errors += 1
        if not self._warned.is_set():
            self._warned.set()
            log.warning("%s in %s: %s (an upload left unfinished by a crash may then not be "
                        "aborted at the next start; further errors are only counted)",
                        what, self.directory, exc.strerror or exc)
