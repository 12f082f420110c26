#!/usr/bin/env bash
# The prepared GPU check (one H200 run, well inside 8 minutes): install, GPU tests, benchmarks,
# and a short CIFAR-10 comparison of the four methods sharing the GPU. Results go to $OUT.
# Every part runs whatever happened to the parts before it: each one's log is kept in
# $OUT/<part>.log and its exit code in $OUT/parts.tsv; the script's exit code is the number of
# parts that failed or were skipped for time (0: all passed), and the last line names them.
# Usage on the device: bash benchmarks/gpu_check.sh   (needs .data/cifar10-jpeg.tar.gz carried)
# Dry-run on a CPU: OUT=/tmp/out GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh
# GPU_CHECK_ONLY=latency: install, info and issue 20's latency figures only (the second run of a
# session that has device time left after the first; same limits and results layout).
set -u
OUT="${OUT:-/tmp/paam_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PAAM_BENCH_OUT="$OUT/bench" PAAM_FAST_CACHE="/tmp/paam_cache"
DRY="${GPU_CHECK_DRY:-0}"
ONLY="${GPU_CHECK_ONLY:-}"
case "$ONLY" in ""|latency) ;; *) echo "GPU_CHECK_ONLY must be empty or latency" >&2; exit 2;; esac
# The whole check ends inside 8 minutes on the H200: every part's limit is cut to what is left
# of DEADLINE seconds, and a part with under 10 s left is skipped (recorded with rc "skip").
# A dry run on a CPU is slower: its limits and deadline are multiplied by SCALE.
SCALE="${GPU_CHECK_SCALE:-$([ "$DRY" = 1 ] && echo 4 || echo 1)}"
DEADLINE=$(( 450 * SCALE ))
start=$(date +%s)
: > "$OUT/parts.tsv"
log() { echo "== $(date +%T) +$(( $(date +%s) - start ))s $*" | tee -a "$OUT/log.txt"; }

# part NAME LIMIT_S CMD...: run CMD with a time limit, its output in $OUT/NAME.log (and the
# last lines in log.txt), its exit code in parts.tsv; never stops the script.
part() {
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  local left=$(( DEADLINE - ($(date +%s) - start) ))
  if [ "$left" -lt 10 ]; then
    log "SKIPPED: $name (${left}s left)"
    printf '%s\tskip\t%ss\n' "$name" "$(( $(date +%s) - start ))" >> "$OUT/parts.tsv"
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  log "$name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v USDT "$OUT/$name.log" | tail -25 | tee -a "$OUT/log.txt"
  printf '%s\t%s\t%ss\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$OUT/parts.tsv"
  [ "$rc" = 0 ] || log "FAILED: $name (rc $rc)"
}

if [ "$DRY" = 0 ]; then
  part install 150 pip install --no-build-isolation --no-deps -e .
fi
part info 30 python -m paam_fast.info

if [ "$ONLY" = latency ]; then
  # Issue 20 on the GPU: predicted against measured latency at 0.3 / 0.5 / 0.7 of dense, PAAM and
  # uniform side by side (bf16, channels_last, as the GPU runs them); JSON under $OUT/bench.
  if [ "$DRY" = 1 ]; then
    R50="--arch resnet20 --size 16 --num-classes 10 --batch 2 --grid 2 --repeats 1 --rounds 1 --match-iters 0"
    R20="$R50"; LT="--dtype float32"
  else
    R50="--arch resnet50 --size 224 --batch 256"
    R20="--arch resnet20 --size 32 --num-classes 10 --batch 256 --round-to 1"; LT="--dtype bfloat16 --channels-last"
  fi
  for cpl in grouped internal; do
    part "latency_resnet50_$cpl" 150 python -m paam_fast.bench.latency $R50 $LT --coupling $cpl --keeps 0.3 0.5 0.7 --refit-in-window --verify-iters 2
  done
  part latency_resnet20_grouped 90 python -m paam_fast.bench.latency $R20 $LT --coupling grouped --keeps 0.3 0.5 0.7 --refit-in-window --verify-iters 2
else

PYT="python -m pytest -q -p no:cacheprovider"
part test_triton_scoring 180 $PYT tests/test_triton_scoring.py
part test_gpu 120 $PYT tests/test_gpu.py tests/test_step.py
part test_masked_ext 90 $PYT tests/test_masked_ext.py tests/test_scoring.py
part test_device_decode 60 $PYT tests/test_device_decode.py

if [ "$DRY" = 1 ]; then ARGS56="--batch 8"; ARGS50="--batch 2 --size 64"; else ARGS56="--batch 128"; ARGS50="--batch 256 --size 224"; fi
for cpl in internal grouped; do for dt in float32 bfloat16; do
  part "bench_scoring_resnet50_${cpl}_$dt" 60 python -m paam_fast.bench.scoring --arch resnet50 --size 224 --coupling $cpl --dtype $dt
done; done
part bench_step_resnet56 90 python -m paam_fast.bench.train_step --arch resnet56 --size 32 $ARGS56
part bench_step_resnet50 120 python -m paam_fast.bench.train_step --arch resnet50 $ARGS50
part bench_masked_resnet50 120 python -m paam_fast.bench.masked --arch resnet50 $ARGS50

# CIFAR-10, ResNet56, the four methods at once on the GPU, in the time that is left.
left=$(( DEADLINE - ($(date +%s) - start) ))
if [ -f .data/cifar10-jpeg.tar.gz ] && [ "$left" -gt $(( 90 * SCALE )) ]; then
  if [ "$DRY" = 1 ]; then EPOCHS=1; EXTRA="--subset 500 --arch resnet20 --batch-size 50"; else EPOCHS=30; EXTRA="--amp bf16 --channels-last --cuda-graphs"; fi
  part cifar_decode 60 python -c "from paam_fast.data import load_cifar10; load_cifar10('.data/cifar10-jpeg.tar.gz')"
  log "CIFAR-10 comparison, $EPOCHS epochs, ${left}s left"
  for m in dense paam slim uniform; do
    part "cifar_$m" $(( (left - 60 * SCALE) / SCALE )) python -m paam_fast.train --dataset cifar10 --data .data/cifar10-jpeg.tar.gz \
      --method "$m" --epochs "$EPOCHS" --keep 0.5 --round-to 1 --quiet --out "$OUT/cifar_$m" $EXTRA &
  done
  wait
  if [ "$DRY" = 1 ]; then ARCH=resnet20; IB="--batch 16"; else ARCH=resnet56; IB=""; fi
  part bench_inference 60 python -m paam_fast.bench.inference --arch $ARCH $IB --model "$OUT"/cifar_{paam,uniform,slim}/model.paam
  # keep what comes back small: the reports, not the checkpoints
  for m in dense paam slim uniform; do rm -f "$OUT/cifar_$m/ckpt.pt" "$OUT/cifar_$m/model.paam"; done
else
  log "CIFAR-10 comparison skipped (.data/cifar10-jpeg.tar.gz missing or ${left}s left)"
fi
fi  # GPU_CHECK_ONLY

failed=$(awk -F'\t' '$2 != "0" {print $1 "(rc " $2 ")"}' "$OUT/parts.tsv" | tr '\n' ' ')
nfail=$(awk -F'\t' '$2 != "0"' "$OUT/parts.tsv" | wc -l)
log "done in $(( $(date +%s) - start )) s; $(wc -l < "$OUT/parts.tsv") parts, $nfail failed: ${failed:-none}"
# What comes back from the device is at most 8 files: pack everything but the summary into one.
tar czf /tmp/paam_results.tar.gz -C "$OUT" --exclude=log.txt --exclude=parts.tsv . && \
  find "$OUT" -mindepth 1 ! -name log.txt ! -name parts.tsv -delete && mv /tmp/paam_results.tar.gz "$OUT/"
exit "$nfail"
