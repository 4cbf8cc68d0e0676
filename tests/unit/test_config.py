"""Unit tests of ``objfs.config``: URL parsing and ``MountConfig.create`` validation."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from objfs.config import MountConfig, RetryConfig, StoreConfig, parse_s3_url
from objfs.errors import ConfigError


@pytest.mark.parametrize(("url", "expected"), [
    ("s3://bkt", ("bkt", "")),
    ("s3://bkt/", ("bkt", "")),
    ("s3://bkt/p", ("bkt", "p/")),
    ("s3://bkt/p/q/", ("bkt", "p/q/")),
    ("s3://My_Bucket.v2-x", ("My_Bucket.v2-x", "")),  # relaxed for S3-compatible stores
    ("s3://bkt/a b/é", ("bkt", "a b/é/")),
    ("s3://bkt/.hidden/x", ("bkt", ".hidden/x/")),  # '.hidden' is a name, not '.'
])
def test_parse_s3_url_good(url: str, expected: tuple[str, str]) -> None:
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize("url", [
    "http://bkt/p",
    "https://s3.amazonaws.com/bkt",
    "S3://bkt",
    "bkt/p",
    "",
    "s3://",
    "s3:///p",
    "s3://bkt/../x",
    "s3://bkt/p/..",
    "s3://bkt/./x",
    "s3://bkt/a//b",
    "s3://bkt/a\0b",
    "s3://-bkt",
    "s3://.bkt",
    "s3://bk t",
    "s3://bkt:9000",
    "s3://bkt?x=1",
    "s3://user@bkt",
    "s3://" + "b" * 256,
])
def test_parse_s3_url_bad(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_s3_url(url)


def create(tmp_path: Path, **kwargs: object) -> MountConfig:
    args: dict[str, object] = dict(url="s3://bkt/data", mountpoint=str(tmp_path / "mnt"),
                                   cache_dir=str(tmp_path / "cache"), region="eu-west-1")
    args.update(kwargs)
    return MountConfig.create(**args)  # type: ignore[arg-type]


def test_create_defaults(tmp_path: Path) -> None:
    config = create(tmp_path)
    assert (config.store.bucket, config.store.prefix) == ("bkt", "data/")
    assert config.store.region == "eu-west-1"
    assert config.store.endpoint is None
    assert config.mountpoint == tmp_path / "mnt"
    assert config.cache_dir == tmp_path / "cache"
    assert (config.file_mode, config.dir_mode) == (0o644, 0o755)
    assert config.ttl_s == 300.0
    assert config.fuse_options == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ttl_s = 1.0  # type: ignore[misc]


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = create(tmp_path, mountpoint="mnt", cache_dir="c")
    assert config.mountpoint == tmp_path / "mnt"
    assert config.cache_dir == tmp_path / "c"


@pytest.mark.parametrize(("text", "mode"), [
    ("0644", 0o644), ("644", 0o644), ("0o755", 0o755), ("0", 0), ("7777", 0o7777),
    ("0400", 0o400),
])
def test_modes_are_octal(tmp_path: Path, text: str, mode: int) -> None:
    assert create(tmp_path, file_mode=text).file_mode == mode
    assert create(tmp_path, dir_mode=text).dir_mode == mode


@pytest.mark.parametrize("text", ["rw-r--r--", "0x1a4", "8", "0649", "", "10000", "-1", "0o"])
@pytest.mark.parametrize("flag", ["file_mode", "dir_mode"])
def test_bad_modes_name_the_flag(tmp_path: Path, flag: str, text: str) -> None:
    with pytest.raises(ConfigError, match="--" + flag.replace("_", "-")):
        create(tmp_path, **{flag: text})


@pytest.mark.parametrize("ttl", [0, 0.0, -1, -0.5, math.nan, math.inf])
def test_ttl_must_be_positive_and_finite(tmp_path: Path, ttl: float) -> None:
    with pytest.raises(ConfigError, match="--ttl"):
        create(tmp_path, ttl=ttl)


def test_ttl_accepted(tmp_path: Path) -> None:
    assert create(tmp_path, ttl=0.5).ttl_s == 0.5
    assert create(tmp_path, ttl=60).ttl_s == 60.0


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_attr_timeout_must_be_finite_and_not_negative(tmp_path: Path, value: float) -> None:
    with pytest.raises(ConfigError, match="--attr-timeout"):
        create(tmp_path, attr_timeout_s=value)


def test_attr_timeout_zero_is_allowed(tmp_path: Path) -> None:
    assert create(tmp_path, attr_timeout_s=0.0).attr_timeout_s == 0.0


def test_negative_ids_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--uid"):
        create(tmp_path, uid=-1)
    with pytest.raises(ConfigError, match="--gid"):
        create(tmp_path, gid=-2)
    config = create(tmp_path, uid=0, gid=1234)
    assert (config.uid, config.gid) == (0, 1234)


@pytest.mark.parametrize(("endpoint", "stored"), [
    ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    ("http://127.0.0.1:9000/", "http://127.0.0.1:9000"),
    ("https://s3.example.com", "https://s3.example.com"),
    ("http://[::1]:8333", "http://[::1]:8333"),
])
def test_endpoint_good(tmp_path: Path, endpoint: str, stored: str) -> None:
    config = create(tmp_path, endpoint=endpoint)
    assert config.store.endpoint == stored
    assert stored in config.store.identity


@pytest.mark.parametrize("endpoint", [
    "127.0.0.1:9000",
    "ftp://host",
    "http://",
    "http://host/path",
    "http://ho st",
    "s3://bkt",
])
def test_endpoint_bad(tmp_path: Path, endpoint: str) -> None:
    with pytest.raises(ConfigError, match="--endpoint"):
        create(tmp_path, endpoint=endpoint)


def test_fuse_options_split_on_commas(tmp_path: Path) -> None:
    config = create(tmp_path, fuse_options=["a,b", "c", " d , ,e ", ""])
    assert config.fuse_options == ("a", "b", "c", "d", "e")


def test_identity_distinguishes_mounts() -> None:
    a = StoreConfig(bucket="bkt", prefix="p/")
    assert a.identity != StoreConfig(bucket="bkt", prefix="q/").identity
    assert a.identity != StoreConfig(bucket="bkt2", prefix="p/").identity
    assert a.identity != StoreConfig(bucket="bkt", prefix="p/", endpoint="http://h:1").identity
    assert a.identity != StoreConfig(bucket="bkt", prefix="p/", region="eu-west-1").identity
    assert a.identity == StoreConfig(bucket="bkt", prefix="p/").identity


@pytest.mark.parametrize("kwargs", [
    dict(fuse_workers=0), dict(read_parallelism=0), dict(read_request_bytes=1000),
    dict(read_request_bytes=0), dict(log_level="LOUD"),
])
def test_other_mount_values_validated(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        create(tmp_path, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(base_delay_s=0), dict(base_delay_s=1.0, max_delay_s=0.5), dict(max_attempts=0),
    dict(budget_s=0),
])
def test_retry_config_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        RetryConfig(**kwargs)  # type: ignore[arg-type]


# ---- the peer cache flags ------------------------------------------------------------------------

@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.secret"
    path.write_bytes(b"0123456789abcdef0123456789abcdef\n")
    path.chmod(0o600)
    return path


def make(**kwargs) -> MountConfig:
    return MountConfig.create(url="s3://bkt/p", mountpoint="/mnt/x", cache_dir="/tmp/c",
                              **kwargs)


def test_no_peer_flags_no_cluster() -> None:
    config = make()
    assert not config.cluster and config.peers == () and config.cluster_secret is None
    assert config.origin_read_limit_bytes is None


def test_peer_flags_build_the_member_list(secret_file: Path) -> None:
    config = make(peer_listen="127.0.0.1:9567",
                  peers=["127.0.0.1:9567,10.0.0.2:9567", " 10.0.0.3:9567 ", "[::1]:9000"],
                  cluster_secret_file=str(secret_file), peer_serve_limit="200M",
                  origin_read_limit="1G/s")
    assert config.cluster and config.peer_listen == ("127.0.0.1", 9567)
    assert config.peer_id == "127.0.0.1:9567"
    assert config.peers == ("127.0.0.1:9567", "10.0.0.2:9567", "10.0.0.3:9567", "[::1]:9000")
    assert config.cluster_secret == b"0123456789abcdef0123456789abcdef"
    assert config.peer_serve_limit_bytes == 200 * 2**20
    assert config.origin_read_limit_bytes == 2**30
    assert "0123456789abcdef" not in repr(config)  # the secret never reaches a log line


def test_wildcard_listen_needs_an_advertised_address(secret_file: Path) -> None:
    with pytest.raises(ConfigError, match="--peer-advertise"):
        make(peer_listen="0.0.0.0:9567", cluster_secret_file=str(secret_file))
    config = make(peer_listen="0.0.0.0:9567", peer_advertise="10.0.0.1:9567",
                  cluster_secret_file=str(secret_file))
    assert config.peer_id == "10.0.0.1:9567" and config.peer_listen == ("0.0.0.0", 9567)
    with pytest.raises(ConfigError, match="wildcard"):
        make(peer_listen="0.0.0.0:9567", peer_advertise="0.0.0.0:9567",
             cluster_secret_file=str(secret_file))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"peers": "127.0.0.1:1"}, "--peers needs --peer-listen"),
    ({"cluster_secret_file": "/x"}, "--cluster-secret-file needs --peer-listen"),
    ({"peer_advertise": "h:1"}, "--peer-advertise needs --peer-listen"),
    ({"peer_serve_limit": "1M"}, "--peer-serve-limit needs --peer-listen"),
    ({"peer_listen": "127.0.0.1:1"}, "needs --cluster-secret-file"),
    ({"peer_listen": "127.0.0.1", "secret": True}, "--peer-listen: '127.0.0.1' is not HOST:PORT"),
    ({"peer_listen": "h:0", "secret": True}, "is not HOST:PORT"),
    ({"peer_listen": "h:70000", "secret": True}, "is not HOST:PORT"),
    ({"peer_listen": "h:1", "peers": "a:1,,b:2", "secret": True}, "--peers: empty entry"),
    ({"peer_listen": "h:1", "peers": "a:1,b", "secret": True}, "--peers: 'b' is not HOST:PORT"),
    ({"peer_listen": "h:1", "peers": "a b:1", "secret": True}, "is not HOST:PORT"),
    ({"peer_listen": "h:1", "peers": "http://a:1", "secret": True}, "is not HOST:PORT"),
    ({"peer_listen": "h:1", "peers": "", "secret": True}, "--peers: empty list"),
    ({"peer_listen": "h:1", "peer_serve_limit": "fast", "secret": True}, "--peer-serve-limit"),
    ({"peer_listen": "h:1", "peer_serve_limit": "0", "secret": True}, "positive rate"),
    ({"origin_read_limit": "-1M"}, "--origin-read-limit"),
])
def test_bad_peer_flags(kwargs: dict, message: str, secret_file: Path) -> None:
    if kwargs.pop("secret", False):
        kwargs["cluster_secret_file"] = str(secret_file)
    with pytest.raises(ConfigError) as info:
        make(**kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_secret_file_is_checked_at_create(secret_file: Path, tmp_path: Path) -> None:
    secret_file.chmod(0o644)
    with pytest.raises(ConfigError, match="accessible by other users"):
        make(peer_listen="h:1", cluster_secret_file=str(secret_file))
    with pytest.raises(ConfigError, match="No such file"):
        make(peer_listen="h:1", cluster_secret_file=str(tmp_path / "missing"))
