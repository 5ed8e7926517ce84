#!/usr/bin/env bash
# A Cloud TPU VM slice: create it (or reuse it), install on every worker, run on all workers.
#
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG [--config.key=value ...]
#   launch/tpu_vm.sh opera-v5p us-east5-a v5p-32 configs/sft_tiny.py --config.workdir=/mnt/runs/sft
#
# Runs on every worker: OPERA_MULTIHOST=1 python -m opera_jax.train --config=CONFIG [overrides]
# (JAX finds the other workers from the TPU metadata). $TPU_VERSION picks the software image.
set -euo pipefail
NAME=${1:?usage: launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG [overrides...]}
ZONE=${2:?zone}
TYPE=${3:?accelerator type, e.g. v5p-32 or v6e-16}
CONFIG=${4:?config file}
shift 4
VERSION=${TPU_VERSION:-v2-alpha-tpuv5}
REPO=$(cd "$(dirname "$0")/.." && pwd)
TPU=(gcloud compute tpus tpu-vm)

if ! "${TPU[@]}" describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  "${TPU[@]}" create "$NAME" --zone "$ZONE" --accelerator-type "$TYPE" --version "$VERSION"
fi
# The committed tree (no local venvs or runs) to every worker, then install there.
ARCHIVE=$(mktemp -t opera_jax.XXXXXX.tar.gz)
git -C "$REPO" archive --format=tar.gz -o "$ARCHIVE" HEAD
"${TPU[@]}" scp "$ARCHIVE" "$NAME":opera_jax.tar.gz --zone "$ZONE" --worker=all
"${TPU[@]}" ssh "$NAME" --zone "$ZONE" --worker=all --command "set -e
  rm -rf ~/opera_jax && mkdir -p ~/opera_jax && tar -xzf ~/opera_jax.tar.gz -C ~/opera_jax
  [ -x ~/opera_env/bin/python ] || python3 -m venv ~/opera_env  # the VM's own environment
  ~/opera_env/bin/pip install -q -e \"\$HOME/opera_jax[tpu]\""
# The remote shell parses the command again: every user value goes in shell-quoted (%q).
CONFIG_Q=$(printf '%q' "$CONFIG")
ARGS=$(printf ' %q' "$@")
"${TPU[@]}" ssh "$NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/opera_jax && OPERA_MULTIHOST=1 ~/opera_env/bin/python -m opera_jax.train --config=$CONFIG_Q$ARGS"
