"""Real clients writing onto a real mount (moto through the fault proxy): checkpoint writers
(safetensors; numpy and pickle saves standing in for torch.save, which is not installed in the
test environment: PyPI's torch wheel drags in gigabytes of CUDA libraries), `git clone`,
`tar x`, `rsync -a` and `cp -a` of a tree, each compared with its source: bytes, modes,
owners and mtimes, at the origin too, and again after a remount.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import shutil
import stat
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load, load_file, save_file

from tests.conftest import Mount

MiB = 1024 * 1024


@pytest.fixture
def mount_rw(mounter, bucket) -> Callable[..., Mount]:
    """The bucket mounted straight on the S3 server, not through the fault proxy: the proxy
    runs in this process, and numpy and safetensors call write/close/read while holding the
    GIL (numpy's ``tofile`` closes a dup of the descriptor with ``fclose``), so the daemon's
    requests would wait for this very thread until they time out."""
    def mount(*flags: str) -> Mount:
        return mounter(f"s3://{bucket}", *flags)
    return mount


def origin(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def run(*cmd: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}{result.stderr}"
    return result.stdout


# ---- checkpoint writers ----------------------------------------------------------------------

def test_safetensors_and_numpy_checkpoints_round_trip(s3, bucket, mount_rw, mounter, tmp_path):
    mount = mount_rw()
    ckpt = mount.path / "ckpt"
    ckpt.mkdir()
    rng = np.random.default_rng(5)
    tensors = {
        "layer0.weight": rng.standard_normal((1024, 1024), dtype=np.float32),  # 4 MiB
        "layer1.weight": rng.standard_normal((2048, 1536), dtype=np.float32),  # 12 MiB
        "embed": rng.standard_normal((3000, 700)).astype(np.float16),
        "step": np.array([1234], dtype=np.int64),
        "mask": rng.integers(0, 2, size=(77, 3), dtype=np.uint8).astype(np.bool_),
    }
    meta = {"format": "np", "epoch": "3"}

    def check_safetensors(path: Path) -> None:
        loaded = load_file(path)
        assert sorted(loaded) == sorted(tensors)
        for name, array in tensors.items():
            assert loaded[name].dtype == array.dtype and np.array_equal(loaded[name], array)
        with safe_open(path, framework="np") as f:  # lazy, ranged reads of one tensor
            assert f.metadata() == meta
            assert np.array_equal(f.get_slice("layer1.weight")[100:200],
                                  tensors["layer1.weight"][100:200])

    # The usual checkpoint dance: write a temporary name, then rename it over the last one.
    save_file(tensors, ckpt / "model.safetensors", metadata=meta)
    save_file({"old": np.zeros(3)}, ckpt / "latest.safetensors")
    save_file(tensors, ckpt / "latest.safetensors.tmp", metadata=meta)
    os.replace(ckpt / "latest.safetensors.tmp", ckpt / "latest.safetensors")
    for name in ("model.safetensors", "latest.safetensors"):
        at_origin = origin(s3, bucket, f"ckpt/{name}")
        assert at_origin == (ckpt / name).read_bytes()
        loaded = load(at_origin)
        assert all(np.array_equal(loaded[k], v) for k, v in tensors.items())
    check_safetensors(ckpt / "model.safetensors")
    check_safetensors(ckpt / "latest.safetensors")

    # torch.save stand-ins: a sequential .npy, a zip archive (zipfile seeks back to patch
    # each member's header: the non-sequential path), and a pickle of the whole state.
    state = {"model": tensors, "optimizer": {"lr": 0.1, "momentum": [1, 2, 3]}, "step": 1234}
    np.save(ckpt / "w.npy", tensors["layer1.weight"])
    np.savez(ckpt / "state.npz", **tensors)
    with open(ckpt / "state.pkl", "wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
    np.savez(tmp_path / "state.npz", **tensors)

    def check_numpy() -> None:
        assert np.array_equal(np.load(ckpt / "w.npy"), tensors["layer1.weight"])
        with np.load(ckpt / "state.npz") as npz:
            assert sorted(npz.files) == sorted(tensors)
            for name, array in tensors.items():
                assert np.array_equal(npz[name], array)
        with open(ckpt / "state.pkl", "rb") as f:
            loaded = pickle.load(f)
        assert loaded["optimizer"] == state["optimizer"] and loaded["step"] == 1234
        for name, array in tensors.items():
            assert np.array_equal(loaded["model"][name], array)

    check_numpy()
    assert origin(s3, bucket, "ckpt/state.npz") == (tmp_path / "state.npz").read_bytes()
    with zipfile.ZipFile(io.BytesIO(origin(s3, bucket, "ckpt/state.npz"))) as z:
        assert z.testzip() is None  # every member's CRC matches: the patched headers landed
    assert sorted(os.listdir(ckpt)) == ["latest.safetensors", "model.safetensors",
                                        "state.npz", "state.pkl", "w.npy"]
    mounter.remount(mount)
    check_safetensors(ckpt / "latest.safetensors")
    check_numpy()


# ---- git -------------------------------------------------------------------------------------

def git_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com", GIT_AUTHOR_DATE="2024-01-01T00:00:00Z",
               GIT_COMMITTER_DATE="2024-01-01T00:00:00Z")
    return env


def make_repo(path: Path, env: dict[str, str]) -> None:
    path.mkdir()
    run("git", "init", "-q", "-b", "main", str(path), env=env)
    rng = random.Random(3)
    (path / "README.md").write_text("hello\n")
    run("git", "add", "-A", cwd=path, env=env)
    run("git", "commit", "-q", "-m", "first", cwd=path, env=env)
    (path / "src").mkdir()
    (path / "src" / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    (path / "src" / "tool.sh").chmod(0o755)
    (path / "data.bin").write_bytes(rng.randbytes(300_000))
    (path / "link").symlink_to("README.md")
    run("git", "add", "-A", cwd=path, env=env)
    run("git", "commit", "-q", "-m", "second", cwd=path, env=env)
    run("git", "tag", "v1", cwd=path, env=env)
    for i in range(5):
        (path / "README.md").write_text(f"hello {i}\n" * (i + 1))
        run("git", "commit", "-q", "-am", f"edit {i}", cwd=path, env=env)


def tracked_files(repo: Path) -> dict[str, tuple[int, bytes]]:
    """path -> (exec bit or symlink, content or link target) of a work tree's tracked files."""
    out = {}
    names = run("git", "ls-files", "-z", cwd=repo).split("\0")
    for name in filter(None, names):
        p = repo / name
        if p.is_symlink():
            out[name] = (-1, os.readlink(p).encode())
        else:
            out[name] = (os.stat(p).st_mode & 0o111, p.read_bytes())
    return out


def test_git_clone_into_the_mount(mount_rw, mounter, tmp_path):
    env = git_env(tmp_path)
    src = tmp_path / "src"
    make_repo(src, env)
    mount = mount_rw()
    log = run("git", "log", "--format=%H %s", "--all", cwd=src, env=env)
    # A local path clone (hard links refused with EPERM: git copies) and a file:// clone
    # (the pack protocol: index-pack writes the pack and seeks back to fix its header).
    run("git", "clone", "-q", str(src), str(mount.path / "local"), env=env)
    run("git", "clone", "-q", f"file://{src}", str(mount.path / "packed"), env=env)
    for name in ("local", "packed"):
        clone = mount.path / name
        run("git", "fsck", "--full", "--strict", cwd=clone, env=env)
        assert run("git", "log", "--format=%H %s", "--all", cwd=clone, env=env) == log
        assert run("git", "status", "--porcelain", cwd=clone, env=env) == ""
        assert tracked_files(clone) == tracked_files(src)
        assert run("git", "config", "core.filemode", cwd=clone, env=env).strip() == "true"
    # Work in the clone: the index and refs are rewritten through lock files and renames.
    clone = mount.path / "packed"
    (clone / "new.txt").write_text("new file\n")
    (clone / "README.md").write_text("changed on the mount\n")
    run("git", "add", "-A", cwd=clone, env=env)
    run("git", "commit", "-q", "-m", "on the mount", cwd=clone, env=env)
    run("git", "gc", "-q", cwd=clone, env=env)
    mounter.remount(mount)
    run("git", "fsck", "--full", "--strict", cwd=clone, env=env)
    assert run("git", "status", "--porcelain", cwd=clone, env=env) == ""
    assert run("git", "log", "-1", "--format=%s", cwd=clone, env=env) == "on the mount\n"
    assert run("git", "show", "HEAD:README.md", cwd=clone, env=env) == "changed on the mount\n"
    run("git", "fsck", "--full", "--strict", cwd=mount.path / "local", env=env)


# ---- tar, rsync, cp -a -----------------------------------------------------------------------

T0 = 1_600_000_000


def make_tree(root: Path) -> None:
    """Files with assorted modes, owners and (whole-second) mtimes, a multipart-sized file,
    an empty one, nested directories with their own modes, and symlinks."""
    rng = random.Random(9)
    root.mkdir()
    files = {
        "top.txt": (b"top\n", 0o644, 0),
        "run.sh": (b"#!/bin/sh\nexit 0\n", 0o755, 1),
        "secret": (b"secret\n", 0o600, 2),
        "readonly.txt": (b"ro\n", 0o444, 3),
        "big.bin": (rng.randbytes(9 * MiB + 5), 0o640, 4),
        "empty": (b"", 0o644, 5),
        "sub/a.json": (b'{"a": 1}\n', 0o664, 6),
        "sub/deep/b.txt": (rng.randbytes(5000), 0o644, 7),
        "sub/deep/er/c.txt": (b"c", 0o400, 8),
    }
    for rel, (data, mode, i) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        if i % 3 == 1:
            os.chown(path, 1234, 5678)
        os.utime(path, (T0 + i * 1000, T0 + i * 1000))
    (root / "link").symlink_to("top.txt")
    (root / "sub" / "uplink").symlink_to("../run.sh")
    os.utime(root / "link", (T0 + 50, T0 + 50), follow_symlinks=False)
    os.utime(root / "sub" / "uplink", (T0 + 60, T0 + 60), follow_symlinks=False)
    for rel, mode, i in [("sub/deep/er", 0o700, 11), ("sub/deep", 0o750, 12), ("sub", 0o755, 13),
                         (".", 0o755, 14)]:
        path = root / rel
        path.chmod(mode)
        os.utime(path, (T0 + i * 1000, T0 + i * 1000))
    os.chown(root / "sub" / "deep", 4321, 8765)


def snapshot(root: Path) -> dict[str, tuple]:
    """relpath -> (type, mode bits, uid, gid, mtime_ns, content or target) of a tree, its
    root included (as '.')."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames] if dirpath == str(root) else \
                [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = os.path.normpath(os.path.relpath(path, root))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", st.st_uid, st.st_gid, st.st_mtime_ns, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                            st.st_mtime_ns)
            else:
                out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                            st.st_mtime_ns, path.read_bytes())
    return out


def diff(got: dict[str, tuple], want: dict[str, tuple]) -> list[str]:
    lines = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
    lines += [f"extra {k}" for k in sorted(got.keys() - want.keys())]
    for key in sorted(want.keys() & got.keys()):
        if got[key] != want[key]:
            lines.append(f"{key}: got {got[key][:5]}, want {want[key][:5]}"
                         + (" (content differs)" if got[key][5:] != want[key][5:] else ""))
    return lines


def test_tar_rsync_and_cp_a_keep_contents_modes_owners_and_mtimes(s3, bucket, mount_rw,
                                                                    mounter, tmp_path):
    assert shutil.which("rsync"), "rsync is needed (apt-get install rsync)"
    src = tmp_path / "tree"
    make_tree(src)
    want = snapshot(src)
    run("tar", "-C", str(src), "-cf", str(tmp_path / "tree.tar"), ".")
    mount = mount_rw()
    root = mount.path
    (root / "tarred").mkdir()
    run("tar", "-C", str(root / "tarred"), "-xf", str(tmp_path / "tree.tar"))
    run("rsync", "-a", f"{src}/", str(root / "rsynced"))
    run("cp", "-a", str(src), str(root / "copied"))
    for name in ("tarred", "rsynced", "copied"):
        assert diff(snapshot(root / name), want) == [], name
        assert origin(s3, bucket, f"{name}/big.bin") == (src / "big.bin").read_bytes()
        assert origin(s3, bucket, f"{name}/link") == b"top.txt"
    mounter.remount(mount)
    for name in ("tarred", "rsynced", "copied"):
        assert diff(snapshot(root / name), want) == [], f"{name} after remount"
    # A second rsync finds nothing to transfer: sizes and mtimes all match.
    out = run("rsync", "-a", "--itemize-changes", f"{src}/", str(root / "rsynced"))
    assert out == "", out
    # The attributes are in the objects' metadata as well as in this host's tree. tar and
    # cp -a set them with fchmod/fchown/futimens on the open descriptor, before close (so
    # with the file's pending single PUT); rsync sets them by path after close.
    for name in ("rsynced", "tarred", "copied"):
        deep = s3.head_object(Bucket=bucket, Key=f"{name}/sub/deep/")["Metadata"]
        assert (deep["mode"], deep["uid"], deep["gid"]) == \
            (str(stat.S_IFDIR | 0o750), "4321", "8765"), name
        for rel in ("run.sh", "secret"):
            want_mode, want_uid, want_gid, want_mtime = want[rel][1:5]
            head = s3.head_object(Bucket=bucket, Key=f"{name}/{rel}")["Metadata"]
            assert (head["mode"], head["uid"], head["gid"], float(head["mtime"])) == \
                (str(stat.S_IFREG | want_mode), str(want_uid), str(want_gid),
                 want_mtime / 1e9), f"{name}/{rel}"
