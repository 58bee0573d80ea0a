#!/usr/bin/env bash
# The whole GPU check, in one call on a lent CUDA machine (under 10 minutes in all):
#
#   1. the environment: GPU, driver, PyTorch;
#   2. tests/test_cuda.py: the CUDA paths (vmap-batched ensemble and its statistics loss, bf16 logits,
#      a short distillation with the automatic settings) against the plain float32 loop;
#   3. benchmarks/distill.py on CUDA, plain float32 loop against the implementation: images/s and peak
#      GPU memory at 28 px (5 small-cnn sites) and at 224 px (5 ResNet-18 sites);
#   4. benchmarks/distill_scaling.py over the GPUs present (nccl), throughput mode;
#   5. the demo end to end on CUDA (smoke preset) on the carried MedMNIST files.
#
# Every step has its own time limit and log under $OUT (seven files: the tool returns at most eight), and a
# failing step does not stop the next; $OUT/summary.txt collects each step's status and last lines.  Before the call, on this machine:
#
#     benchmarks/gpu/fetch_wheels.sh
#
# then one call of the device tool: command "bash benchmarks/gpu/check.sh", carry [".whl", ".gpu_data"],
# timeout_s 600.  Record the numbers with the card's name in benchmarks/RESULTS.md.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu checks this script itself on a machine without a GPU
started=$(date +%s)
summary=$OUT/summary.txt
: > "$summary"

step() {   # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, note the outcome
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    { echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s; $(( $(date +%s) - started )) s so far)"
      tail -n 8 "$OUT/$name.log"; echo; } >> "$summary"
}

if [ -d .whl ]; then   # the packages the image lacks (benchmarks/gpu/fetch_wheels.sh)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        > /tmp/install.log 2>&1 || { echo "install failed" >> "$summary"; tail -n 20 /tmp/install.log >> "$summary"; }
    export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export SECURE_ONESHOT_DATA=${SECURE_ONESHOT_DATA:-$PWD/.gpu_data}

step environment 30 bash -c "nvidia-smi; $PY -c 'import torch, secure_oneshot; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0)); print(\"secure-oneshot\", secure_oneshot.__version__)'"
step cuda_tests 90 env SECURE_ONESHOT_TEST_DEVICE=$DEVICE $PY -m pytest -q -p no:cacheprovider -n 0 tests/test_cuda.py tests/test_fused_paths.py
step distill_28px 100 $PY benchmarks/distill.py --device $DEVICE --size 28 --steps 20 --repeat 2 --peak-gflops 67000
step distill_224px 150 $PY benchmarks/distill.py --device $DEVICE --size 224 --batch-size 32 --steps 10 --repeat 1 --peak-gflops 67000
step scaling 80 $PY benchmarks/distill_scaling.py --device $DEVICE --world-sizes 1 --epochs 3
# The demo's run folder holds many files; the device tool returns at most 8, so only its log (with --json) comes back.
rm -rf /tmp/gpu-check-demo
step demo_smoke 120 $PY -m secure_oneshot demo --preset smoke --device $DEVICE --out /tmp/gpu-check-demo --json
echo "total $(( $(date +%s) - started )) s" >> "$summary"
cat "$summary"
