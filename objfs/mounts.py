"""What the kernel has mounted where, read from /proc/self/mountinfo.

Kept free of heavy imports: ``objfs umount`` and ``objfs stats`` use it and should start fast.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040); everything
    else, UTF-8 included, is literal."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), field)


def mounted_fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly at ``path`` (from /proc/self/mountinfo), or None."""
    target = os.path.realpath(path) if os.path.exists(path) else str(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        fields = line.split()
        if len(fields) < 10:
            continue
        mount_point = unescape_mountinfo(fields[4])
        if mount_point == target or mount_point == str(path):
            sep = fields.index("-")
            found = fields[sep + 1]  # the last (topmost) mount wins
    return found
