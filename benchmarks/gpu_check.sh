#!/usr/bin/env bash
# The prepared GPU check (one H200 run, well inside 8 minutes): install, GPU tests, benchmarks,
# and a short CIFAR-10 comparison of the four methods sharing the GPU. Results go to $OUT.
# Usage on the device: bash benchmarks/gpu_check.sh   (needs .data/cifar10-jpeg.tar.gz carried)
# Dry-run on a CPU: OUT=/tmp/out GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/paam_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PAAM_BENCH_OUT="$OUT/bench" PAAM_FAST_CACHE="/tmp/paam_cache"
DRY="${GPU_CHECK_DRY:-0}"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }
start=$(date +%s)

log install
if [ "$DRY" = 0 ]; then
  pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3 | tee -a "$OUT/log.txt"
fi
python -m paam_fast.info 2>&1 | tee -a "$OUT/log.txt"

log "GPU tests"
timeout 240 python -m pytest -q -x tests/test_gpu.py tests/test_masked_ext.py tests/test_scoring.py \
  tests/test_step.py tests/test_device_decode.py tests/test_triton_scoring.py \
  -p no:logging 2>&1 | tail -15 | tee -a "$OUT/log.txt"

if [ "$DRY" = 1 ]; then ARGS56="--batch 8"; ARGS50="--batch 2 --size 64"; else ARGS56="--batch 128"; ARGS50="--batch 256 --size 224"; fi
log "scoring ops, resnet50"
timeout 120 python -m paam_fast.bench.scoring --arch resnet50 --size 224 2>&1 | grep -v USDT | tee -a "$OUT/log.txt"
log "train step resnet56"
timeout 120 python -m paam_fast.bench.train_step --arch resnet56 --size 32 $ARGS56 2>&1 | grep -v USDT | tee -a "$OUT/log.txt"
log "train step resnet50"
timeout 150 python -m paam_fast.bench.train_step --arch resnet50 $ARGS50 2>&1 | grep -v USDT | tee -a "$OUT/log.txt"
log "masked compute resnet50"
timeout 150 python -m paam_fast.bench.masked --arch resnet50 $ARGS50 2>&1 | grep -v USDT | tee -a "$OUT/log.txt"

# CIFAR-10, ResNet56, the four methods at once on the GPU, in the time that is left.
left=$(( 450 - ($(date +%s) - start) ))
if [ -f .data/cifar10-jpeg.tar.gz ] && [ "$left" -gt 90 ]; then
  if [ "$DRY" = 1 ]; then EPOCHS=1; EXTRA="--subset 500 --arch resnet20 --batch-size 50"; else EPOCHS=30; EXTRA="--amp bf16 --channels-last --cuda-graphs"; fi
  log "CIFAR-10 comparison, $EPOCHS epochs, ${left}s left"
  python -c "from paam_fast.data import load_cifar10; load_cifar10('.data/cifar10-jpeg.tar.gz')"
  for m in dense paam slim uniform; do
    timeout $(( left - 90 )) python -m paam_fast.train --dataset cifar10 --data .data/cifar10-jpeg.tar.gz \
      --method "$m" --epochs "$EPOCHS" --keep 0.5 --round-to 1 --quiet --out "$OUT/cifar_$m" $EXTRA \
      > "$OUT/cifar_$m.log" 2>&1 &
  done
  wait
  for m in dense paam slim uniform; do tail -1 "$OUT/cifar_$m.log" | tee -a "$OUT/log.txt"; done
  log "inference of the pruned networks"
  if [ "$DRY" = 1 ]; then ARCH=resnet20; IB="--batch 16"; else ARCH=resnet56; IB=""; fi
  timeout 60 python -m paam_fast.bench.inference --arch $ARCH $IB --model "$OUT"/cifar_{paam,uniform,slim}/model.paam \
    2>&1 | grep -v USDT | tee -a "$OUT/log.txt"
  # keep what comes back small: the reports, not the checkpoints
  for m in dense paam slim uniform; do rm -f "$OUT/cifar_$m/ckpt.pt" "$OUT/cifar_$m/model.paam"; done
fi
log "done in $(( $(date +%s) - start )) s"
# What comes back from the device is at most 8 files: pack everything but the log into one.
tar czf /tmp/paam_results.tar.gz -C "$OUT" --exclude=log.txt . && \
  find "$OUT" -mindepth 1 ! -name log.txt -delete && mv /tmp/paam_results.tar.gz "$OUT/"
