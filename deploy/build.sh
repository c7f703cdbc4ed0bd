#!/usr/bin/env bash
# Installs pacs-node into a virtualenv: the one script the container file runs (and the
# deploy test runs with PIP_FLAGS=--dry-run). Environment:
#   SRC       the repo (default: the folder above this script)
#   PREFIX    the virtualenv to create (default /opt/pacs-node/venv)
#   VARIANT   cpu | cuda: which torch build (default cpu)
#   TORCH_CPU_INDEX  index of CPU torch wheels (default PyTorch's; "" = the default index)
#   SKIP_APT  1 = do not install Debian packages
#   PIP_FLAGS extra pip flags (e.g. --dry-run)
set -euo pipefail
SRC=${SRC:-$(cd "$(dirname "$0")/.." && pwd)}
PREFIX=${PREFIX:-/opt/pacs-node/venv}
VARIANT=${VARIANT:-cpu}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}
PIP_FLAGS=${PIP_FLAGS:-}

case "$VARIANT" in cpu|cuda) ;; *) echo "VARIANT must be cpu or cuda, got '$VARIANT'" >&2; exit 2;; esac

if [ "${SKIP_APT:-0}" != 1 ]; then
  apt-get update -qq
  # dcmtk: storescu/echoscu for operators' checks; libgl not needed (headless)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv dcmtk ca-certificates
  rm -rf /var/lib/apt/lists/*
fi

python3 -m venv "$PREFIX"
"$PREFIX/bin/python" -m pip install -q --upgrade pip
if [ "$VARIANT" = cpu ] && [ -n "$TORCH_CPU_INDEX" ]; then
  "$PREFIX/bin/python" -m pip install -q $PIP_FLAGS --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION"
else
  # PyPI's Linux torch wheels bundle CUDA
  "$PREFIX/bin/python" -m pip install -q $PIP_FLAGS "torch==$TORCH_VERSION"
fi
"$PREFIX/bin/python" -m pip install -q $PIP_FLAGS "$SRC"
echo "pacs-node installed in $PREFIX ($VARIANT)"
