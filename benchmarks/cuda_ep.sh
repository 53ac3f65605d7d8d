#!/usr/bin/env bash
# The CUDA execution provider measured end to end (issue 12): ResNet-18/50 dense, unstructured and structured
# through `bench`'s CUDA path (I/O binding, each call synchronised) at batch 1, 8 and 64, on a lent GPU machine.
#
# Here, once, from the repository root:
#   bash ../shared/tools/ortgpu-parts.sh     # onnxruntime-gpu in parts under .ortgpu/ (ignored)
#   bash benchmarks/cuda_ep.sh --wheels      # onnxsim and onnx-ir for Python 3.12 under .whl/ (ignored):
#                                            # the GPU image lacks onnxsim and holds an older onnx-ir
# Then the device calls ortgpu-parts.sh prints, back to back, the last one carrying ".whl" beside its part,
# with YOUR_COMMAND = `bash benchmarks/cuda_ep.sh`. Results (.json, .md, the log) go to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "onnxsim==0.8.1" "onnx-ir==1.1.0"
  ls -la .whl
  exit 0
fi

: "${OUT:?set OUT to the folder the results go to}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD/.ortgpu/site:/tmp/site:$PWD:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
python3 -c 'import torch, onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers()); print("torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 benchmarks/bench_resnet.py --provider "${PROVIDER:-cuda}" --batch "${BATCH:-1,8,64}" --threads 1 \
  --repeat "${REPEAT:-15}" --out "$OUT" --name "bench_resnet_${PROVIDER:-cuda}" 2>&1 | tee "$OUT/bench_resnet_${PROVIDER:-cuda}.log"
