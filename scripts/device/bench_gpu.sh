#!/usr/bin/env bash
# GPU figures for docs/benchmarks.md in one short run: model forward, two-pass eval, train step,
# all at the paper's ConvNeXt-B / 768 px shapes with random weights (weights do not change the cost).
#
#   OUT=/some/dir bash scripts/device/bench_gpu.sh          # on a GPU machine, from the repo root
#   OUT=/tmp/b DPSEG_BENCH_SMOKE=1 bash scripts/device/bench_gpu.sh   # CPU smoke run, tiny sizes
#
# Where the machine lacks dpseg's pure-Python deps, put their wheels in .whl/ (docs/benchmarks.md).
set -u
: "${OUT:?set OUT to a folder for the JSON results}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import open_clip, zarr, webdataset" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dpseg-site .whl/*.whl \
    || exit 1
  export PYTHONPATH=$PYTHONPATH:/tmp/dpseg-site
fi
DPSEG="python3 -m cli.main"

if [ -n "${DPSEG_BENCH_SMOKE:-}" ]; then
  ENC=tiny; SIZE=64; DEV=cpu; DTYPE=fp32; CLASSES=20,40; BATCHES=1; TRAIN_CLASSES=8; TEMPLATES=4; TSTEPS=2
  EVAL_CLASSES=20,40; RATIO_CLASSES=20
else
  ENC=convnext-b; SIZE=768; DEV=cuda; DTYPE=fp16; CLASSES=150,847; BATCHES=1,4; TRAIN_CLASSES=36; TEMPLATES=80
  TSTEPS=10; EVAL_CLASSES=150,459,847; RATIO_CLASSES=150
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
fi
status=0
# 1. forward: whole model, trunk, decoder, class-chunked decoder, early rejection (SED top-1)
timeout 150 python3 scripts/device/bench_model.py --encoder $ENC --size $SIZE --device $DEV --dtype $DTYPE \
  --classes $CLASSES --batches $BATCHES --out "$OUT/model_${ENC}_${SIZE}_${DTYPE}.json" || status=1
# 2. two-pass vs one-pass evaluation, memory and latency against the class count
timeout 120 $DPSEG bench eval --encoder $ENC --size $SIZE --device $DEV --classes $EVAL_CLASSES --ratio-classes $RATIO_CLASSES \
  --batch 2 --repeats 3 -o "$OUT/eval_${ENC}_${SIZE}.json" > /dev/null || status=1
# 3. train step: real loader + bank vs in-memory tensors, dual vs text-only (the 36 seen shapes classes: the bench bank is procedural; 80 templates)
timeout 180 $DPSEG bench train --encoder $ENC --size $SIZE --classes $TRAIN_CLASSES --templates $TEMPLATES \
  --batch-size 2 --steps $TSTEPS --rounds 1 --num-workers 2 --device $DEV --mixed-precision auto \
  -o "$OUT/train_${ENC}_${SIZE}.json" > /dev/null || status=1
ls -la "$OUT"
exit $status
