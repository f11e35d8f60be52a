#!/usr/bin/env bash
# Fetch the wheels that the GPU suite (benchmarks/gpu_suite.sh) carries to the device machine: the
# packages vit_lens imports that its image lacks. The image has Python 3.12, torch, torchvision, timm,
# transformers, huggingface-hub, accelerate, pandas, pyarrow, numpy, einops, jaxtyping, safetensors,
# tqdm, rich, sentencepiece, protobuf, xxhash, fsspec, pytest and hypothesis; it has no
# transformer-lens (nor plotly, open_clip or beartype, which the suite does not need), and nothing can
# be fetched there.
#
#   bash benchmarks/fetch_wheels.sh            # here, where pip reaches PyPI; writes benchmarks/wheels/
#
# The set is exactly what `import transformer_lens` needs on top of that image (found in a venv
# holding only the image's packages): transformer-lens itself, and datasets, dill and multiprocess,
# which transformer_lens imports at start. Its other declared requirements (beartype, typeguard,
# fancy-einsum, wandb, transformers-stream-generator) are never imported by what vit_lens uses, so
# they stay behind. All pure Python (py3-none-any) or cp312 manylinux wheels: about 2.5 MB, far
# inside the 64 MiB that travels. The folder is ignored by git (.gitignore); carry it:
#   run(command="bash benchmarks/gpu_suite.sh", carry=["benchmarks/wheels"], timeout_s=420)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST=benchmarks/wheels
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" \
    transformer-lens==4.3.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -l "$DEST"
du -sh "$DEST"
