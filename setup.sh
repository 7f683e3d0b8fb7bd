#!/usr/bin/env bash
# Create .venv and install mlx_bonsai with the MLX backend this machine can use.
#   ./setup.sh         the package (Metal on macOS, CUDA 13 where nvidia-smi sees a GPU, else CPU)
#   ./setup.sh --dev   plus the test extra (pytest, ruff, torch, diffusers, transformers)
# Safe to run again: it reuses .venv and only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"

dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "setup.sh: '$python' not found; install Python >= 3.10 or set PYTHON=/path/to/python" >&2; exit 1; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "setup.sh: $("$python" --version 2>&1) is too old; mlx_bonsai needs Python >= 3.10 (set PYTHON=...)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $("$python" --version 2>&1)"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)

case "$(uname -s)" in
  Darwin) backend="" ; echo "==> macOS: MLX with Metal" ;;
  *)
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      backend="cuda"; echo "==> NVIDIA GPU found: MLX with the CUDA 13 backend"
    else
      backend="cpu"; echo "==> no GPU found: MLX with the CPU backend"
    fi ;;
esac

extras="$backend"
if [ "$dev" = 1 ]; then
  extras="${extras:+$extras,}test"
  # The CPU wheel of torch 2.13.0 is available offline on our Linux machines; a bare
  # "torch" could pull a multi-GB CUDA build instead.
  if [ "$(uname -s)" = Linux ]; then
    echo "==> installing torch==2.13.0 (test reference)"
    "${pip[@]}" "torch==2.13.0"
  fi
fi

echo "==> installing mlx_bonsai${extras:+[$extras]} (editable)"
"${pip[@]}" -e ".${extras:+[$extras]}"
.venv/bin/python -c 'import mlx.core as mx, mlx_bonsai; print("==> ready: mlx", mx.__version__, "on", mx.default_device())'
