#!/usr/bin/env bash
# One GPU node, one process driving all its GPUs (jax[cuda]): install, then run a config.
#
#   launch/gpu_node.sh configs/grpo_qwen3_0p6b_gpu.py --config.model.hf_dir=/ckpt/Qwen3-0.6B
#
# Runs: python -m opera_jax.train --config=CONFIG [overrides...] in the venv $VENV
# (default .venv-cuda, created and installed with `pip install -e ".[cuda]"` on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/gpu_node.sh CONFIG [--config.key=value ...]}
shift
VENV=${VENV:-.venv-cuda}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -e ".[cuda]"
# JAX may take 90 % of GPU memory up front; the rest is left for cuDNN workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
exec "$VENV/bin/python" -m opera_jax.train --config="$CONFIG" "$@"
