#!/usr/bin/env bash
# The checks that need a GPU, in one run: the model-backend tests through CUDA and half precision (tiny models),
# then the memory benchmark at real sizes on CUDA. Logs go to LOGDIR (default: gpu-checks/).
#
#   bash benchmarks/gpu_checks.sh [LOGDIR]        # PYTHON=... to pick the interpreter (default: .venv/bin/python)
set -u
LOGDIR=${1:-gpu-checks}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$LOGDIR"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
    || exit 1
ASPIRE_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_caption.py tests/test_ground.py \
    tests/test_edit.py tests/test_generate.py tests/test_models.py tests/test_methods.py tests/test_core.py \
    tests/test_real_backends.py 2>&1 | tee "$LOGDIR/cuda-tests.log"
tests=${PIPESTATUS[0]}
"$PYTHON" benchmarks/gpu_memory.py --device cuda --sizes real --models "$LOGDIR/models" 2>&1 \
    | tee "$LOGDIR/memory.log" | grep '^|'
memory=${PIPESTATUS[0]}
rm -rf "$LOGDIR/models"
[ "$tests" -eq 0 ] && [ "$memory" -eq 0 ]
