"""GPU figures for docs/benchmarks.md: `dpseg bench model` at the paper's settings.

Runs where dpseg is importable from the repo root (PYTHONPATH=.), e.g. on a lent GPU machine:
    python3 scripts/device/bench_model.py --out $OUT/bench_model_gpu.json
CPU smoke run: python3 scripts/device/bench_model.py --encoder tiny --device cpu --dtype fp32 --size 64
"""

import argparse
import json

from dpseg.io import atomic_write_json
from pipeline.bench_model import bench_model

parser = argparse.ArgumentParser()
parser.add_argument("--encoder", default="convnext-b")
parser.add_argument("--size", type=int, default=768)
parser.add_argument("--device", default="cuda")
parser.add_argument("--dtype", default="fp16")
parser.add_argument("--classes", default="150,847")
parser.add_argument("--batches", default="1,8")
parser.add_argument("--chunk", type=int, default=128)
parser.add_argument("--out", required=True)
args = parser.parse_args()
ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731

runs = {
    "one_pass": bench_model(args.encoder, args.size, ints(args.classes), ints(args.batches), args.dtype, args.device,
                            warmup=3, repeats=10),
    f"class_chunk_{args.chunk}": bench_model(args.encoder, args.size, [max(ints(args.classes))], ints(args.batches),
                                             args.dtype, args.device, warmup=2, repeats=5, class_chunk=args.chunk),
}
atomic_write_json(args.out, runs)
print(f"{'run':<16}{'batch':>6}{'classes':>8}{'ms/img':>10}{'trunk ms/img':>14}{'dec share':>10}{'peak MiB':>10}")
for name, run in runs.items():
    for r in run["results"]:
        print(f"{name:<16}{r['batch']:>6}{r['classes']:>8}{r['model_ms_per_image']:>10.2f}{r['trunk_ms_per_image']:>14.2f}"
              f"{r['decoder_share']:>10.3f}{r['peak_mem_mib_model']:>10.0f}")
print(json.dumps({"device": runs["one_pass"]["device"], "torch": runs["one_pass"]["torch"]}))
