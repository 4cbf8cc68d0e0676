"""``mount.objfs``: lets mount(8) and /etc/fstab mount objfs.

mount(8) runs ``mount.objfs SPEC DIR [-sfnv] [-o OPTIONS]``. Options that name an objfs flag
(``endpoint=``, ``region=``, ``cache_dir=``, ``ttl=``, ``uid=``, ``gid=``, ``file_mode=``,
``dir_mode=``, ``allow_other``, ``profile=``) become that flag; mount(8)'s own generic options
(``defaults``, ``_netdev``, ``noauto``, ``nofail``, ``user``, ``rw``...) are dropped; the rest
pass through to FUSE with ``-o``. Example fstab line:

    s3://datasets/imagenet /mnt/imagenet objfs _netdev,allow_other,endpoint=http://s3.local:8333,cache_dir=/nvme/objfs 0 0
"""

from __future__ import annotations

import os
import sys

from objfs.tools import cli

_FLAG_OPTIONS = {"endpoint", "region", "cache_dir", "ttl", "uid", "gid", "file_mode",
                 "dir_mode", "log_level", "log_file", "attr_timeout", "fuse_workers"}
_SWITCH_OPTIONS = {"allow_other", "foreground"}
_DROPPED = {"defaults", "_netdev", "noauto", "auto", "nofail", "user", "nouser", "users",
            "rw", "ro", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "x-systemd.automount"}


def translate(argv: list[str]) -> list[str]:
    """mount(8)-style argv -> ``objfs mount`` argv."""
    positional: list[str] = []
    options: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            options.extend(next(it, "").split(","))
        elif arg.startswith("-o"):
            options.extend(arg[2:].split(","))
        elif arg.startswith("-"):
            continue  # -s -f -n -v from mount(8): nothing to do
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise SystemExit("usage: mount.objfs s3://BUCKET[/PREFIX] MOUNTPOINT [-o OPTIONS]")
    out = ["mount", positional[0], positional[1]]
    passthrough: list[str] = []
    for opt in filter(None, options):
        name, eq, value = opt.partition("=")
        if name == "profile" and eq:
            os.environ["AWS_PROFILE"] = value
        elif name in _FLAG_OPTIONS and eq:
            out += ["--" + name.replace("_", "-"), value]
        elif name in _SWITCH_OPTIONS and not eq:
            out.append("--" + name.replace("_", "-"))
        elif name in _DROPPED or name.startswith("x-") or name.startswith("comment="):
            continue
        else:
            passthrough.append(opt)
    if passthrough:
        out += ["-o", ",".join(passthrough)]
    return out


def main() -> int:
    return cli.main(translate(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
