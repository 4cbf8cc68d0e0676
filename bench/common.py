"""Shared helpers: step errors, subprocesses with timeouts, timing, paths."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
DEFAULT_DATA_DIR = BENCH_DIR / ".data"
DEFAULT_RESULTS_DIR = BENCH_DIR / "results"


class StepError(Exception):
    """A measured step failed; the run is reported as failed (not dropped)."""

    status = "failed"


class StepTimeout(StepError):
    """A measured step ran past its timeout; the run is reported as timed out."""

    status = "timeout"


def tail(text: str | bytes | None, lines: int = 15) -> str:
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run(cmd: list[str], *, timeout: float, what: str, env: dict | None = None,
        capture: bool = True, check: bool = True, stdout=None,
        stderr=None) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd`` with a hard timeout; return (completed process, wall seconds).

    A timeout kills the whole process group of the child and raises StepTimeout; a non-zero
    exit raises StepError (when ``check``) with the tail of its output.
    """
    kwargs: dict = dict(env=env, start_new_session=True)
    if stdout is not None:
        # a daemonizing child (s3fs, rclone --daemon) keeps inherited pipes open: give it the
        # log file for stderr too, or communicate() waits for the daemon to exit
        kwargs["stdout"] = stdout
        kwargs["stderr"] = stderr if stderr is not None else subprocess.PIPE
    elif capture:
        kwargs["stdout"] = subprocess.PIPE
        kwargs["stderr"] = subprocess.PIPE
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise StepTimeout(f"{what}: timed out after {timeout:g} s: {' '.join(cmd)}\n{tail(err)}") from None
    elapsed = time.perf_counter() - t0
    cp = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise StepError(f"{what}: exit {proc.returncode}: {' '.join(cmd)}\n"
                        f"{tail(err) or tail(out)}")
    return cp, elapsed


def _kill_group(proc: subprocess.Popen) -> None:
    # The child was started in its own session, so its pgid is its pid: this only reaches
    # processes this harness started.
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass


def find_tool(name: str) -> str | None:
    """A tool from this venv's bin first (pip-installed binaries), then PATH."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    return shutil.which(name)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM/... in KiB and utime+stime from /proc (raises OSError if gone)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM", "VmSize", "Threads"):
                out[key] = int(val.split()[0])
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    # fields[0] is state (field 3); utime is field 14, stime field 15 -> index 11, 12
    out["cpu_ticks"] = int(fields[11]) + int(fields[12])
    out["clk_tck"] = ticks
    return out


def now_stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # without guest time, already counted in user
    return total - idle, total


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


class HostLoad:
    """How busy the whole machine was during a run (other jobs share these 2 cores)."""

    def __init__(self) -> None:
        self.busy0, self.total0 = cpu_times()
        self.load0 = loadavg()

    def finish(self) -> dict:
        busy, total = cpu_times()
        dt = max(1, total - self.total0)
        return {"cpu_busy_pct": round(100 * (busy - self.busy0) / dt, 1),
                "loadavg_start": self.load0, "loadavg_end": loadavg()}


# --------------------------------------------------------------------------------------------
# kernel caches, memory sampling, errors

def drop_caches() -> float:
    """``sync; echo 3 > /proc/sys/vm/drop_caches`` (root): the whole machine's page cache,
    dentries and inodes. Returns seconds (the sync can take a while after big writes)."""
    t0 = time.perf_counter()
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    return time.perf_counter() - t0


class RssSampler:
    """Samples VmRSS of some pids every ``interval`` seconds in a thread; ``peak_mib(pid)`` is the
    largest sample, ``hwm_mib(pid)`` the kernel's VmHWM (peak over the process's life) at stop.

    Used as a context manager around a measured step."""

    def __init__(self, pids, interval: float = 0.1):
        import threading
        self.pids = [p for p in pids if p]
        self.interval = interval
        self.peak: dict[int, int] = {}
        self.first: dict[int, int] = {}
        self.hwm: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")

    def _sample(self) -> None:
        for pid in self.pids:
            try:
                st = proc_status(pid)
            except OSError:
                continue
            self.first.setdefault(pid, st["VmRSS"])
            self.peak[pid] = max(self.peak.get(pid, 0), st["VmRSS"])
            self.hwm[pid] = st["VmHWM"]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "RssSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()

    def peak_mib(self, pid: int) -> float | None:
        return self.peak[pid] / 1024 if pid in self.peak else None

    def first_mib(self, pid: int) -> float | None:
        return self.first[pid] / 1024 if pid in self.first else None

    def hwm_mib(self, pid: int) -> float | None:
        return self.hwm[pid] / 1024 if pid in self.hwm else None


def errno_label(text: str | bytes | None) -> str | None:
    """The errno name (``EROFS``, ``ENOSPC``...) that a tool's error message names, if any:
    strerror texts (dd, cp, cat) and fio's ``err=N/...``."""
    import errno as _errno
    import re
    if not text:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    m = re.search(r"err=\s*(\d+)", text)
    if m and int(m.group(1)) in _errno.errorcode:
        return _errno.errorcode[int(m.group(1))]
    for code, name in sorted(_errno.errorcode.items()):
        msg = os.strerror(code)
        if msg and not msg.startswith("Unknown error") and msg in text:
            return name
    return None


class RowFailure(StepError):
    """One contender failed one figure (e.g. writes on a read-only mount): that figure's cell
    shows ``label`` for this run; the run and the other contenders go on."""

    def __init__(self, label: str, detail: str = ""):
        super().__init__(f"{label}: {detail}" if detail else label)
        self.label = label
        self.detail = detail


def evict_file(path) -> None:
    """Drop one local file's clean pages from the kernel page cache (not the whole machine's)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user+sys) a live process has used so far."""
    st = proc_status(pid)
    return st["cpu_ticks"] / st["clk_tck"]
