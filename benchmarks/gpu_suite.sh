#!/usr/bin/env bash
# The GPU suite (issue 17): parity tests on CUDA, bench_forward, the patching benchmark, stream /
# dataset-run throughput and peak memory, in float32 and bfloat16, written as one Markdown report.
#
#   bash benchmarks/gpu_suite.sh                      # on a GPU machine, from the repository root
#   bash benchmarks/gpu_suite.sh --device cpu --quick # dry run anywhere (CPU, tiny models)
#
# With the device tool: first, on this machine,
#   pip download --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
#       --platform any -d benchmarks/wheels transformer-lens==4.3.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# then run it with carry=["benchmarks/wheels"] (ignored by git; about 2.4 MB) and timeout_s=420; the
# report comes back as $OUT/gpu_suite.md. The wheels are installed (--no-deps, offline) only where
# transformer_lens does not import. Budget: under 5 minutes on one GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import transformer_lens" 2>/dev/null; then
    if ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install --no-deps --no-index --quiet benchmarks/wheels/*.whl || echo "wheel install failed"
    else
        echo "transformer_lens is missing and benchmarks/wheels/ is empty: see the header of this script" >&2
        exit 2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
exec "$PY" benchmarks/gpu_suite.py --out "${OUT:-benchmarks/results}/gpu_suite.md" "$@"
