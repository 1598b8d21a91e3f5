#!/usr/bin/env bash
# Does a longer-pretrained tiny CLIP lift the demo? The demo pipeline's stages, run by hand on a
# GPU machine with the demo profile except clip.steps (and the devices): zero-shot accuracy, then
# seen / unseen pass-I mIoU of a segmenter trained on top, to set beside the CPU demo's figures.
#
#   OUT=/some/dir CLIP_STEPS=3000 bash scripts/device/demo_longer_clip.sh      # GPU machine, repo root
#   OUT=/tmp/x CLIP_STEPS=20 TRAIN_STEPS=4 DEVICE=cpu bash scripts/device/demo_longer_clip.sh   # CPU smoke run
#
# Writes into a scratch copy of the out/ folders ($WORK) and copies the metrics to $OUT.
set -eu
: "${OUT:?set OUT to a folder for the results}"
CLIP_STEPS=${CLIP_STEPS:-3000}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/dpseg-longer-clip}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import open_clip, zarr, webdataset" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dpseg-site .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/dpseg-site
fi
mkdir -p "$OUT" "$WORK"
train_steps=${TRAIN_STEPS:+"steps: $TRAIN_STEPS"}
cat > "$WORK/params.yaml" <<EOF
profile: demo
clip: {steps: $CLIP_STEPS, device: $DEVICE}
bank: {device: $DEVICE}
train: {${train_steps:-}}
eval: {sets: [seen, unseen], passes: 1, device: $DEVICE}
EOF
cd "$WORK"
for stage in data clip bank-base bank train; do
  start=$(date +%s)
  python3 -m pipeline.stages $stage params.yaml > "$WORK/$stage.log" 2>&1 || { tail -20 "$WORK/$stage.log"; exit 1; }
  echo "$stage: $(( $(date +%s) - start )) s"
  if [ $stage = clip ]; then  # kept even if a later stage runs out of time
    cp out/clip/metrics.json "$OUT/clip_metrics.json"
    grep -o '"zero_shot_accuracy": [0-9.]*' out/clip/metrics.json
  fi
done
for set in seen unseen; do
  python3 -m pipeline.stages eval params.yaml --set $set > "$WORK/eval-$set.log" 2>&1 || { tail -20 "$WORK/eval-$set.log"; exit 1; }
done
cp metrics/eval/seen.json "$OUT/eval_seen.json"
cp metrics/eval/unseen.json "$OUT/eval_unseen.json"
cp params.yaml "$OUT/params.yaml"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
clip = json.load(open(f"{out}/clip_metrics.json"))
print("clip steps", clip["steps"], "zero-shot", round(clip["zero_shot_accuracy"], 3), clip["attribute_accuracy"],
      "train_s", clip["train_s"])
for s in ("seen", "unseen"):
    m = json.load(open(f"{out}/eval_{s}.json"))
    print(s, "pass I mIoU", round(m["pass1"]["miou"], 1), "uniform", round(m["pass1"]["uniform_random_miou"], 1))
PY
