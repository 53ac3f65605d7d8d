#!/usr/bin/env bash
# The CUDA execution provider measured end to end (issue 12): ResNet-18/50 dense, unstructured and structured
# through `bench`'s CUDA path (I/O binding, each call synchronised) at batch 1, 8 and 64, on a lent GPU machine;
# then both models in float16 (--half), and the latency table on CUDA, predicted against measured
# (benchmarks/latency_prediction.py --provider cuda). At most about 8 minutes in all.
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

# Then the same models in float16, as GPUs deploy them (HALF=0 leaves it out), under its own timeout.
set +e
if [ "${HALF:-1}" = 1 ]; then
  timeout "${HALF_SECONDS:-150}" python3 benchmarks/bench_resnet.py --provider "${PROVIDER:-cuda}" --half \
    --batch "${BATCH:-1,8,64}" --threads 1 --repeat "${REPEAT:-15}" --out "$OUT" \
    --name "bench_resnet_${PROVIDER:-cuda}_fp16" 2>&1 | tee "$OUT/bench_resnet_${PROVIDER:-cuda}_fp16.log"
fi

# Then, in what time the call has left, the latency table on the same provider (`--latency-provider cuda`):
# ResNet-20 profiled and its random prunings predicted against measured, batch 1 then batch 8, and with
# LP_RESNET18=1 ResNet-18 at batch 1 (some 1500 grid points: minutes on CUDA). Each part writes its own results
# under its own timeout, so one cut short costs only itself.
P=${PROVIDER:-cuda}
parts="resnet20:1 resnet20:8"
[ "${LP_RESNET18:-0}" = 1 ] && parts="$parts resnet18:1"
for part in $parts; do
  model=${part%%:*}; batch=${part##*:}; name="latency_prediction_${P}_${model}_b${batch}"
  timeout "${LP_SECONDS:-100}" python3 benchmarks/latency_prediction.py --provider "$P" --models "$model" \
    --batch "$batch" --step 16 --step-resnet18 64 --out "$OUT" --table-dir "$OUT/tables" --name "$name" 2>&1 \
    | tee "$OUT/$name.log"
done
exit 0
