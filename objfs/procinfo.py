"""Process liveness as the kernel sees it, for ``objfs umount``, the dev server, bench and tests.

A process that exited but is not reaped yet (a zombie) still answers signal 0; init on some
hosts reaps slowly, so every "is the daemon gone?" check must treat a zombie as gone.
"""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            # "pid (comm) state ...": comm may contain ') ', so split at the last ')'.
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
