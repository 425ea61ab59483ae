#!/usr/bin/env bash
# Installs tl-align-hf with its test tools and the optional timm family.
# torch 2.14.1 and torchvision 0.29.1 go first, as a pair (torchvision's compiled operators must match torch), so
# that the package's `torch`/`torchvision` requirements are already met and pip resolves nothing else for them.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING" || true
python -m pip install -q --disable-pip-version-check -e ".[test,timm]" 2>&1 | grep -v "^WARNING" || true
python -c "import torch, torchvision, transformers, tl_align_hf; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| transformers', transformers.__version__)"
