#!/usr/bin/env bash
# Install torch into the given Python's environment, preferring a CPU build on a machine without an NVIDIA GPU.
# An unpinned `pip install torch` on Linux x86_64 pulls a CUDA build of several GB, of no use without a GPU.
set -euo pipefail
py=${1:?usage: install-torch.sh PYTHON}
pip=("$py" -m pip install --disable-pip-version-check -q)

if "$py" -c "import torch" 2>/dev/null; then
    echo "torch $("$py" -c 'import torch; print(torch.__version__)') already installed"
    exit 0
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "NVIDIA GPU found: installing the default (CUDA) torch build"
    exec "${pip[@]}" "torch>=2.2"
fi

# 1. A CPU wheel already on this machine, in pip's configured --find-links folders (no index, no download).
if "${pip[@]}" --no-index --no-deps --only-binary=:all: "torch>=2.2" 2>/dev/null \
    && ver=$("$py" -c "from importlib.metadata import version; print(version('torch'))") \
    && [[ "$ver" == *+cpu ]]; then
    echo "installed local CPU build torch $ver; now its dependencies"
    exec "${pip[@]}" "torch==$ver"
fi
"$py" -m pip uninstall -y -q torch >/dev/null 2>&1 || true

# 2. PyTorch's CPU wheel index (Linux x86_64 needs it; elsewhere PyPI's torch is already a CPU build).
if [ "$(uname -s)" = "Linux" ] && [ "$(uname -m)" = "x86_64" ]; then
    if "${pip[@]}" --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple \
        --timeout 20 --retries 1 "torch>=2.2" 2>/dev/null; then
        echo "installed torch from the CPU wheel index"
        exit 0
    fi
fi

# 3. Whatever the configured index offers.
echo "installing torch from the default index"
exec "${pip[@]}" "torch>=2.2"
