"""The upload ledger on its own: what a start after a crash finds in it."""

from __future__ import annotations

from pathlib import Path

from objfs.uploads import PendingUpload, UploadLedger


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def test_pending_lists_what_started_and_did_not_end_oldest_first(tmp_path: Path) -> None:
    ledger = UploadLedger(tmp_path / "uploads", "b", clock=FakeClock())
    ledger.started("k2", "id-2")
    ledger.started("k1", "id-1")
    ledger.started("k3", "id-3")
    ledger.ended("id-1")
    ledger.ended("never-started")             # harmless
    reopened = UploadLedger(tmp_path / "uploads", "b")
    assert reopened.pending() == [PendingUpload("b", "k2", "id-2", 101.0),
                                  PendingUpload("b", "k3", "id-3", 103.0)]


def test_leftovers_of_a_crash_while_recording_are_cleaned(tmp_path: Path) -> None:
    ledger = UploadLedger(tmp_path / "uploads", "b")
    ledger.started("k", "id")
    (tmp_path / "uploads" / "half.tmp").write_text('{"bucket": "b"')   # died before rename
    (tmp_path / "uploads" / "bad.json").write_text("{not json")
    (tmp_path / "uploads" / "short.json").write_text('{"bucket": "b"}')
    assert [p.upload_id for p in ledger.pending()] == ["id"]
    remaining = list((tmp_path / "uploads").iterdir())    # only the good record is left
    assert len(remaining) == 1 and remaining[0].suffix == ".json"
    assert ledger.write_errors == 0
