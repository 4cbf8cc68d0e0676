"""Bad input gets one clear line on stderr, a non-zero exit within 10 s, no traceback, and
nothing left mounted."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tests.conftest import OBJFS, mount_type, process_alive, run_objfs, start_moto


def mount_fails(args: list[str], mp: Path | None, *, env: dict[str, str] | None = None,
                expect: str) -> str:
    started = time.monotonic()
    result = subprocess.run([OBJFS, *args], capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL, env=env)
    elapsed = time.monotonic() - started
    assert result.returncode != 0, result
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert expect in result.stderr, result.stderr
    if mp is not None:
        assert mount_type(mp) is None, "left something mounted"
    return lines[-1] if lines else ""


@pytest.fixture
def mp(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


def _one_line(stderr_last: str) -> None:
    assert stderr_last.startswith("objfs: ") and "\n" not in stderr_last


def test_missing_bucket(s3_endpoint, mp, tmp_path):
    line = mount_fails(["mount", "--endpoint", s3_endpoint, "--cache-dir", str(tmp_path / "c"),
                        "s3://no-such-bucket-here", str(mp)], mp, expect="does not exist")
    _one_line(line)


def test_unreachable_endpoint(mp, tmp_path):
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = mount_fails(["mount", "--endpoint", f"http://127.0.0.1:{port}", "--cache-dir",
                        str(tmp_path / "c"), "s3://bucket", str(mp)], mp, expect="cannot reach")
    _one_line(line)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts connections and never answers: the hanging-origin case."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_endpoint_that_never_answers(silent_server, mp, tmp_path):
    line = mount_fails(["mount", "--endpoint", f"http://127.0.0.1:{silent_server}",
                        "--cache-dir", str(tmp_path / "c"), "s3://bucket", str(mp)], mp,
                       expect="cannot reach")
    _one_line(line)


@pytest.fixture(scope="module")
def auth_server() -> Iterator[tuple[str, dict[str, str]]]:
    """A moto server that checks credentials and signatures (IAM auth switched on)."""
    proc, endpoint = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
        iam.create_user(UserName="trainer")
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        good = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=good["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=good["AWS_SECRET_ACCESS_KEY"])
        s3.create_bucket(Bucket="secured")
        s3.put_object(Bucket="secured", Key="data/x.bin", Body=b"signed bytes" * 100_000)
        yield endpoint, good
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("key_id, secret, code", [
    ("AKIANOTAREALKEY00000", "whatever", "InvalidAccessKeyId"),
    (None, "wrong-secret", "SignatureDoesNotMatch"),
])
def test_wrong_credentials(auth_server, mp, tmp_path, key_id, secret, code):
    endpoint, good = auth_server
    env = dict(os.environ, AWS_ACCESS_KEY_ID=key_id or good["AWS_ACCESS_KEY_ID"],
               AWS_SECRET_ACCESS_KEY=secret)
    line = mount_fails(["mount", "--endpoint", endpoint, "--cache-dir", str(tmp_path / "c"),
                        "s3://secured/data", str(mp)], mp, env=env, expect="access denied")
    assert code in line
    _one_line(line)


def test_no_credentials_at_all(s3_endpoint, mp, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    line = mount_fails(["mount", "--endpoint", s3_endpoint, "--cache-dir", str(tmp_path / "c"),
                        "s3://bucket", str(mp)], mp, env=env, expect="no AWS credentials")
    _one_line(line)


def test_right_credentials_sign_bulk_reads_correctly(auth_server, mounter):
    """The ranged GETs go through aiohttp with botocore's signer: a checking server accepts."""
    endpoint, good = auth_server
    saved = {k: os.environ[k] for k in good}
    os.environ.update(good)
    try:
        mount = mounter("s3://secured/data", endpoint=endpoint)
        assert (mount.path / "x.bin").read_bytes() == b"signed bytes" * 100_000
    finally:
        os.environ.update(saved)


@pytest.mark.parametrize("url, expect", [
    ("bucket", "not an s3:// URL"),
    ("http://bucket/x", "not an s3:// URL"),
    ("s3://", "no bucket"),
    ("s3:///prefix", "no bucket"),
    ("s3://b!d/x", "invalid bucket name"),
    ("s3://bucket/a/../b", "'.' or '..'"),
])
def test_malformed_url(s3_endpoint, mp, tmp_path, url, expect):
    line = mount_fails(["mount", "--endpoint", s3_endpoint, "--cache-dir", str(tmp_path / "c"),
                        url, str(mp)], mp, expect=expect)
    _one_line(line)


def test_missing_mountpoint(s3_endpoint, bucket, tmp_path):
    line = mount_fails(["mount", "--endpoint", s3_endpoint, f"s3://{bucket}",
                        str(tmp_path / "nope")], None, expect="does not exist")
    _one_line(line)


def test_mountpoint_is_a_file(s3_endpoint, bucket, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    line = mount_fails(["mount", "--endpoint", s3_endpoint, f"s3://{bucket}", str(f)], None,
                       expect="is not a directory")
    _one_line(line)


def test_mountpoint_not_empty(s3_endpoint, bucket, mp, tmp_path):
    (mp / "something").write_text("x")
    line = mount_fails(["mount", "--endpoint", s3_endpoint, "--cache-dir", str(tmp_path / "c"),
                        f"s3://{bucket}", str(mp)], mp, expect="not empty")
    _one_line(line)


def test_already_mounted(s3, bucket, mounter, tmp_path):
    s3.put_object(Bucket=bucket, Key="a", Body=b"a")
    mount = mounter(f"s3://{bucket}")
    line = mount_fails(["mount", "--endpoint", mount.endpoint, "--cache-dir",
                        str(tmp_path / "other"), f"s3://{bucket}", str(mount.path)], None,
                       expect="already a mount point")
    _one_line(line)
    assert mount_type(mount.path) == "fuse.objfs"   # the first mount is untouched


def test_cache_dir_in_use_by_another_mount(s3, bucket, mounter, tmp_path):
    s3.put_object(Bucket=bucket, Key="a", Body=b"a")
    first = mounter(f"s3://{bucket}")
    mp2 = tmp_path / "second"
    mp2.mkdir()
    line = mount_fails(["mount", "--endpoint", first.endpoint, "--cache-dir",
                        str(first.cache_dir), f"s3://{bucket}", str(mp2)], mp2, expect="in use")
    assert str(first.pid) in line
    _one_line(line)


@pytest.mark.parametrize("make_bad", ["file", "under-file", "proc"])
def test_unusable_cache_dir(s3_endpoint, bucket, mp, tmp_path, make_bad):
    if make_bad == "file":
        bad = tmp_path / "cachefile"
        bad.write_text("x")
        expect = "not a directory"
    elif make_bad == "under-file":
        (tmp_path / "f").write_text("x")
        bad = tmp_path / "f" / "cache"
        expect = "cannot create cache dir"
    else:
        bad = Path("/proc/objfs-cache")
        expect = "cannot create cache dir"
    line = mount_fails(["mount", "--endpoint", s3_endpoint, "--cache-dir", str(bad),
                        f"s3://{bucket}", str(mp)], mp, expect=expect)
    _one_line(line)


@pytest.mark.parametrize("args, expect", [
    (["mount", "--ttl", "soon", "s3://bucket", "/tmp"], "invalid float value"),
    (["mount", "--ttl", "-5", "s3://bucket", "/tmp"], "--ttl"),
    (["mount", "--file-mode", "rwx", "s3://bucket", "/tmp"], "--file-mode"),
    (["mount", "--endpoint", "not a url", "s3://bucket", "/tmp"], "--endpoint"),
    (["mount", "--no-such-flag", "s3://bucket", "/tmp"], "unrecognized arguments"),
    (["mount", "s3://bucket"], "required"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_flags(args, expect):
    result = run_objfs(*args, timeout=20)
    assert result.returncode != 0
    assert expect in result.stderr
    assert "Traceback" not in result.stderr


def test_stale_mount_left_by_a_killed_daemon(s3, bucket, mounter, tmp_path):
    s3.put_object(Bucket=bucket, Key="a", Body=b"a")
    mount = mounter(f"s3://{bucket}")
    pid = mount.pid
    os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)   # until then the mount is live and "already a mount point" is right
    assert not process_alive(pid)
    line = mount_fails(["mount", "--endpoint", mount.endpoint, "--cache-dir",
                        str(mount.cache_dir), f"s3://{bucket}", str(mount.path)], None,
                       expect="dead FUSE mount")
    _one_line(line)
    result = run_objfs("umount", str(mount.path))
    assert result.returncode == 0, result.stderr
    assert mount_type(mount.path) is None
    again = run_objfs(*mount.args)  # and the cache dir (its tree and lock) is usable again
    assert again.returncode == 0, again.stderr
    assert (mount.path / "a").read_bytes() == b"a"
