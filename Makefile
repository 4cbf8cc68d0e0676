# objfs developer entry points.
#
#   make setup   Debian packages, .venv and an editable install (quick when already done)
#   make run     local SeaweedFS with a sample dataset, mounted at ./mnt
#   make stop    unmount ./mnt and stop the local SeaweedFS
#   make test    the test suite (what CI runs, through .ci/run)
#   make bench   the benchmark harness
#   make clean   stop, then remove .objfs-run/ and mnt/

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OBJFS := $(VENV)/bin/objfs
STAMP := $(VENV)/.objfs-installed
APT_PACKAGES := fuse3 libfuse-dev pkg-config fio git rsync
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

RUN_DIR := .objfs-run
SEAWEED_DIR := $(RUN_DIR)/seaweed
CACHE_DIR := $(RUN_DIR)/cache
MNT := mnt
MNT_ABS := $(abspath $(MNT))
BUCKET := objfs-sample

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

# Exit 0 if $(MNT) is a mount point. Reads mountinfo instead of stat()ing the path, which fails
# with ENOTCONN on the mount of a dead FUSE daemon.
is_mounted = awk -v m="$(MNT_ABS)" '$$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo
# Exit 0 if that mount is objfs's (llfuse mounts it with subtype=objfs: fstype fuse.objfs).
is_objfs_mount = awk -v m="$(MNT_ABS)" '$$5 == m && / - fuse\.objfs / { found = 1 } END { exit !found }' /proc/self/mountinfo

.PHONY: help setup apt-packages run stop test bench clean

help:
	@sed -n 's/^#   //p' $(firstword $(MAKEFILE_LIST))

setup: apt-packages $(STAMP)

apt-packages:
	@missing=""; \
	for pkg in $(APT_PACKAGES); do \
	  status=$$(dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null || true); \
	  [ "$$status" = "install ok installed" ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  command -v apt-get >/dev/null || { echo "setup: please install:$$missing" >&2; exit 1; }; \
	  echo "setup: installing Debian packages:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstalled only when pyproject.toml changes (or the venv is new).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,run,bench]'
	@touch $@

run: setup
	@export AWS_ACCESS_KEY_ID="$${AWS_ACCESS_KEY_ID:-objfs}" \
	        AWS_SECRET_ACCESS_KEY="$${AWS_SECRET_ACCESS_KEY:-objfs-secret}" \
	        AWS_DEFAULT_REGION="$${AWS_DEFAULT_REGION:-us-east-1}"; \
	endpoint=$$($(PY) -m objfs.tools.devserver start --dir $(SEAWEED_DIR) --bucket $(BUCKET)); \
	if $(is_objfs_mount) && stat -t $(MNT) >/dev/null 2>&1; then \
	  echo "./$(MNT) is already an objfs mount"; \
	else \
	  if $(is_objfs_mount); then \
	    echo "./$(MNT): its objfs daemon is gone, unmounting the stale mount"; \
	    fusermount -u -z $(MNT) 2>/dev/null || umount -l $(MNT); \
	  elif $(is_mounted); then \
	    echo "./$(MNT) is already a mount point of something else: unmount it first" >&2; \
	    exit 1; \
	  fi; \
	  mkdir -p $(MNT); \
	  $(OBJFS) mount --endpoint "$$endpoint" --cache-dir $(CACHE_DIR) s3://$(BUCKET) ./$(MNT); \
	  echo "objfs: s3://$(BUCKET) from $$endpoint is mounted at ./$(MNT)"; \
	fi; \
	echo; \
	echo "Look at it:"; \
	echo "  ls -R ./$(MNT) | head"; \
	echo "  cat ./$(MNT)/README.txt"; \
	echo "  md5sum ./$(MNT)/models/tiny/model.bin"; \
	echo "Stop it:"; \
	echo "  make stop"

stop:
	@if $(is_mounted); then \
	  if ! stat -t $(MNT) >/dev/null 2>&1; then \
	    echo "objfs: the daemon of ./$(MNT) is gone, unmounting the stale mount"; \
	    fusermount -u -z $(MNT) 2>/dev/null || umount -l $(MNT); \
	  elif ! $(OBJFS) umount ./$(MNT); then \
	    echo "stop: could not unmount ./$(MNT); close what uses it (fuser -vm ./$(MNT)) and retry" >&2; \
	    exit 1; \
	  else \
	    echo "objfs: unmounted ./$(MNT)"; \
	  fi; \
	fi
	@if [ -x $(PY) ]; then $(PY) -m objfs.tools.devserver stop --dir $(SEAWEED_DIR); fi

test: setup
	$(VENV)/bin/ruff check objfs cache master tools tests bench
	$(PY) -m pytest -q -ra

bench: setup
	$(PY) -m bench

# Never rm -rf a live mount: that would delete the bucket's objects. `stop` fails if it cannot
# unmount, and the check below guards against anything it missed.
clean: stop
	@if $(is_mounted); then echo "clean: ./$(MNT) is still mounted" >&2; exit 1; fi
	rm -rf $(RUN_DIR) $(MNT)
