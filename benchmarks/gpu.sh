#!/usr/bin/env bash
# GPU checks for one lent H200 (15 minutes of device time in all; this script is sized to finish in ~5-8 minutes):
#   (a) patch loss and a full forward in bf16 against fp32, (b) DeepSpeed ZeRO-2 bf16 throughput and MFU of the
#   paper-370m model in both phases, single GPU, (c) the patch speedup at K=4.
# Run from the repository root: bash benchmarks/gpu.sh [extra gpu_check.py flags]
# Outputs: "$OUT" if set, else benchmarks/results/gpu (gpu_check.md, gpu_check.json, gpu_check.log, env.txt).
# The machine has no internet: nothing is installed here; the script stops with a clear message if torch,
# transformers or deepspeed is missing. Python: $PYTHON, else .venv/bin/python, else python3.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT_DIR="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT_DIR"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

{
  echo "date: $(date -u +%FT%TZ)"
  echo "python: $PY ($($PY --version 2>&1))"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 || echo "nvidia-smi: not available"
} | tee "$OUT_DIR/env.txt"

echo "== versions"
if ! $PY -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__); print('cuda available:', torch.cuda.is_available(), '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>&1 | grep -v "^\[" | tee -a "$OUT_DIR/env.txt"; then
  echo "gpu.sh: FAILED: torch, transformers and deepspeed must be importable by $PY (this machine has no internet;" \
       "install them with the project, torch built for this CUDA, before running)" | tee -a "$OUT_DIR/env.txt"
  exit 3
fi
if ! $PY -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "gpu.sh: FAILED: torch sees no CUDA device" | tee -a "$OUT_DIR/env.txt"
  exit 4
fi

export DS_ACCELERATOR=cuda TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export GPU_CHECK_COMMAND="bash benchmarks/gpu.sh${*:+ $*}"
echo "== gpu_check (limit 480 s)"
timeout 480 "$PY" benchmarks/gpu_check.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 124 ]; then echo "gpu.sh: gpu_check.py ran past 480 s; partial results in $OUT_DIR"; fi
echo "gpu.sh: exit $rc; results in $OUT_DIR"
exit "$rc"
