#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one run (< 8 minutes on an H100/H200): model forward
# (eager and torch.compile'd decoder), two-pass eval, train step, bank build (eager vs
# --compile unet,vae,channels-last, warm-up apart) and bank re-encoding throughput, at the paper's
# ConvNeXt-B / 768 px / SD1.5 shapes with random weights (weights do not change the cost).
#
#   bash scripts/device/bench_gpu.sh                          # on a GPU machine, from the repo root; JSON -> docs/bench/
#   OUT=/tmp/b DPSEG_BENCH_SMOKE=1 bash scripts/device/bench_gpu.sh   # CPU smoke run, tiny sizes, same steps
#
# Where the machine lacks dpseg's pure-Python deps, put their wheels in .whl/ (docs/benchmarks.md).
set -u
OUT=${OUT:-docs/bench}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import open_clip, zarr, webdataset, diffusers" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dpseg-site .whl/*.whl \
    || exit 1
  export PYTHONPATH=$PYTHONPATH:/tmp/dpseg-site
fi
DPSEG="python3 -m cli.main"
STAMP=$(date -u +%Y-%m-%d)

if [ -n "${DPSEG_BENCH_SMOKE:-}" ]; then
  TAG=cpu-smoke; ENC=tiny; SIZE=64; DEV=cpu; DTYPE=fp32; CLASSES=20,40; BATCHES=1; TRAIN_CLASSES=8; TEMPLATES=4; TSTEPS=2
  EVAL_CLASSES=20,40; RATIO_CLASSES=20
  GEN=tiny-sd; GRES=32; GSTEPS=2; GBATCH=2; GBATCHES=2; COMPILE=channels-last
  ENC_SIZES=32,64; ENC_IMAGES=32; ENC_RES=64; ENC_BATCH=8; ENC_WORKERS=1; MODEL_COMPILE=
else
  TAG=gpu; ENC=convnext-b; SIZE=768; DEV=cuda; DTYPE=fp16; CLASSES=150,847; BATCHES=1,8; TRAIN_CLASSES=36; TEMPLATES=80
  TSTEPS=10; EVAL_CLASSES=150,459,847; RATIO_CLASSES=150
  GEN=sd15-random; GRES=768; GSTEPS=25; GBATCH=8; GBATCHES=6; COMPILE=unet,vae,channels-last
  ENC_SIZES=320,768; ENC_IMAGES=4096; ENC_RES=768; ENC_BATCH=256; ENC_WORKERS=12; MODEL_COMPILE=--compile-decoder
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_${STAMP}.csv"
fi
status=0
step() { echo "== $1 ($(date -u +%H:%M:%S))"; }
# 1. forward: whole model, trunk, decoder (eager and compiled), chunked decoder, early rejection
step "model forward"
timeout 160 python3 scripts/device/bench_model.py --encoder $ENC --size $SIZE --device $DEV --dtype $DTYPE \
  --classes $CLASSES --batches $BATCHES $MODEL_COMPILE --out "$OUT/model_${TAG}_${ENC}_${SIZE}_${DTYPE}.json" || status=1
# 2. two-pass vs one-pass evaluation, memory and latency against the class count
step "eval"
timeout 120 $DPSEG bench eval --encoder $ENC --size $SIZE --device $DEV --classes $EVAL_CLASSES --ratio-classes $RATIO_CLASSES \
  --batch 2 --repeats 3 --topk 16 -o "$OUT/eval_${TAG}_${ENC}_${SIZE}.json" > /dev/null || status=1
# 3. train step: real loader + bank vs in-memory tensors, dual vs text-only
step "train"
timeout 90 $DPSEG bench train --encoder $ENC --size $SIZE --classes $TRAIN_CLASSES --templates $TEMPLATES \
  --batch-size 2 --steps $TSTEPS --rounds 1 --num-workers 2 --device $DEV --mixed-precision auto \
  -o "$OUT/train_${TAG}_${ENC}_${SIZE}.json" > /dev/null || status=1
# 4. bank build: bare diffusers loop vs bank build, eager and compiled, warm-up apart (one run)
step "bank build"
timeout 140 python3 -m pipeline.bench.bank --generator $GEN --device $DEV --resolution $GRES --steps $GSTEPS \
  --batch-sizes $GBATCH --batches $GBATCHES --rounds 1 --compile $COMPILE --encoder $ENC \
  -o "$OUT/bank_${TAG}_${GEN}_${GRES}.json" > /dev/null || status=1
# 5. bank re-encoding throughput at the tower's native size and at the segmenter's input size
step "bank encode"
timeout 90 python3 -m pipeline.bench.bank --encode-only --encoder $ENC --encode-sizes $ENC_SIZES \
  --encode-images $ENC_IMAGES --resolution $ENC_RES --encode-batch-size $ENC_BATCH --encode-workers $ENC_WORKERS \
  --device $DEV -o "$OUT/encode_${TAG}_${ENC}.json" > /dev/null || status=1
step "done"
ls -la "$OUT"
exit $status
