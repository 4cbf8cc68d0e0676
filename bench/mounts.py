"""Driving a FUSE client under test through its CLI: mount, umount, cleanup, daemon stats.

Only objfs for now; s3fs-fuse and rclone will get a class with the same methods.
"""

from __future__ import annotations

import os
import time
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


class ObjfsClient:
    name = "objfs"

    def __init__(self, endpoint: str, region: str = "us-east-1", extra_args: list[str] = (),
                 exe: str | None = None, mount_timeout: float = 900, umount_timeout: float = 120):
        self.exe = exe or find_tool("objfs")
        self.endpoint = endpoint
        self.region = region
        self.extra_args = list(extra_args)
        self.mount_timeout = mount_timeout
        self.umount_timeout = umount_timeout
        self.pids_seen: set[int] = set()

    def available(self) -> tuple[bool, str]:
        if not self.exe:
            return False, "objfs CLI not found (pip install -e . into the venv)"
        try:
            run([self.exe, "mount", "--help"], timeout=60, what="objfs mount --help")
        except StepError as e:
            return False, str(e)
        return True, self.exe

    def version(self) -> str:
        try:
            from importlib.metadata import version
            return version("objfs")
        except Exception:  # noqa: BLE001
            return "not installed"

    def mount(self, url: str, mp: Path, cache_dir: Path, log_path: Path) -> tuple[float, int]:
        """Run ``objfs mount``; return (seconds until the command returned, daemon pid)."""
        mp.mkdir(parents=True, exist_ok=True)
        cmd = [self.exe, "mount", "--endpoint", self.endpoint, "--region", self.region,
               "--cache-dir", str(cache_dir), *self.extra_args, url, str(mp)]
        with open(log_path, "ab") as logf:
            logf.write(("$ " + " ".join(cmd) + "\n").encode())
            logf.flush()
            try:
                cp, secs = run(cmd, timeout=self.mount_timeout, what="objfs mount",
                               stdout=logf, check=False)
            finally:
                # a daemon that came up late (after a timeout) must still be found and stopped
                pid = self.daemon_pid(mp)
                if pid:
                    self.pids_seen.add(pid)
            if cp.stderr:
                logf.write(cp.stderr)
        if cp.returncode != 0:
            raise StepError(f"objfs mount exit {cp.returncode}: "
                            f"{cp.stderr.decode('utf-8', 'replace').strip()[-2000:]}")
        if not is_fuse_mounted(mp):
            raise StepError(f"objfs mount returned 0 but {mp} is not a FUSE mount "
                            f"(type {mount_fstype(mp)})")
        pid = self.daemon_pid(mp)
        if not pid:
            raise StepError(f"no user.objfs.pid xattr on {mp}")
        return secs, pid

    @staticmethod
    def daemon_pid(mp: Path) -> int | None:
        try:
            if not is_fuse_mounted(mp):
                return None
            return int(os.getxattr(str(mp), "user.objfs.pid").decode().strip())
        except (OSError, ValueError):
            return None

    def umount(self, mp: Path, log_path: Path | None = None) -> float:
        """Run ``objfs umount`` (which waits for the daemon to exit); return seconds."""
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
        return secs

    def cleanup(self, mp: Path, log=print) -> list[str]:
        """Best effort: leave nothing mounted and no daemon we started running.

        ``objfs umount``, then ``fusermount -u``, then ``umount -l``; then SIGTERM / SIGKILL
        the daemon pids seen for this client (learned from the mount's xattr)."""
        notes = []
        pid = self.daemon_pid(mp)
        if pid:
            self.pids_seen.add(pid)
        # a daemon whose mount command timed out may not have mounted (yet): find it by its
        # command line, which names this run's unique mount point
        self.pids_seen.update(pids_with_arg(str(mp)))
        if is_fuse_mounted(mp):
            try:
                self.umount(mp)
            except StepError as e:
                notes.append(f"cleanup: {e}")
        for cmd in (["fusermount", "-u", str(mp)], ["fusermount3", "-u", str(mp)],
                    ["umount", str(mp)], ["umount", "-l", str(mp)]):
            if not is_fuse_mounted(mp):
                break
            if not find_tool(cmd[0]):
                continue
            try:
                cp, _ = run(cmd, timeout=30, what=cmd[0], check=False)
                notes.append(f"cleanup: {' '.join(cmd)} -> {cp.returncode}")
            except StepError as e:
                notes.append(f"cleanup: {e}")
        for pid in sorted(self.pids_seen):
            if not pid_alive(pid):
                continue
            notes.append(f"cleanup: daemon {pid} still alive; SIGTERM")
            os.kill(pid, 15)
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid_alive(pid):
                notes.append(f"cleanup: daemon {pid} SIGKILL")
                os.kill(pid, 9)
        self.pids_seen = {p for p in self.pids_seen if pid_alive(p)}
        for n in notes:
            log(n)
        return notes


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
