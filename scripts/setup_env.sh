#!/usr/bin/env bash
# Installs tl-align-hf and its test tools. The CPU build of torch goes first, so that the package's
# `torch` requirement is already met and pip does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING" || true
python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING" || true
python -c "import torch, transformers, tl_align_hf; print('torch', torch.__version__, '| transformers', transformers.__version__)"
