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
