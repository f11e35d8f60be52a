#!/usr/bin/env bash
# The GPU suite (issue 17): parity tests on CUDA, bench_forward, the patching benchmarks (exact and
# attribution), the dataset-run throughput through the real `vit-lens run` engine and peak memory, in
# float32 and bfloat16, written as one Markdown report (steps: benchmarks/gpu_suite.py).
#
#   bash benchmarks/gpu_suite.sh                      # on a GPU machine, from the repository root
#   bash benchmarks/gpu_suite.sh --device cpu --quick # dry run anywhere (CPU, tiny models)
#
# With the device tool: first, on this machine (pip reaches PyPI here),
#   bash benchmarks/fetch_wheels.sh     # transformer-lens + datasets, dill, multiprocess: ~2.4 MB
# then run it with carry=["benchmarks/wheels"] (ignored by git) and timeout_s=420; the report comes
# back as $OUT/gpu_suite.md (the log as $OUT/gpu_suite.log). The wheels are installed offline
# (--no-deps --no-index) into a folder of their own, put first on PYTHONPATH, only where
# transformer_lens does not import. Budget: 270 s of steps, under 5 minutes in all on one GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUTDIR="${OUT:-benchmarks/results}"
mkdir -p "$OUTDIR"
if ! "$PY" -c "import transformer_lens" 2>/dev/null; then
    if ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
        SITE="${VIT_LENS_WHEEL_SITE:-${TMPDIR:-/tmp}/vit_lens_gpu_site}"
        "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" benchmarks/wheels/*.whl || echo "wheel install failed" >&2
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "transformer_lens is missing and benchmarks/wheels/ is empty: run benchmarks/fetch_wheels.sh first" >&2
        exit 2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
"$PY" benchmarks/gpu_suite.py --out "$OUTDIR/gpu_suite.md" "$@" 2>&1 | tee "$OUTDIR/gpu_suite.log"
