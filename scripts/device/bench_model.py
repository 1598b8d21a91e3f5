"""GPU figures for docs/benchmarks.md: `dpseg bench model` at the paper's settings.

Runs where dpseg is importable from the repo root (PYTHONPATH=.), e.g. on a lent GPU machine:
    python3 scripts/device/bench_model.py --out $OUT/bench_model_gpu.json
CPU smoke run: python3 scripts/device/bench_model.py --encoder tiny --device cpu --dtype fp32 --size 64
"""

import argparse
import json

from dpseg.io import atomic_write_json
from pipeline.bench.model import bench_model

parser = argparse.ArgumentParser()
parser.add_argument("--encoder", default="convnext-b")
parser.add_argument("--size", type=int, default=768)
parser.add_argument("--device", default="cuda")
parser.add_argument("--dtype", default="fp16")
parser.add_argument("--classes", default="150,847")
parser.add_argument("--batches", default="1,8")
parser.add_argument("--chunk", type=int, default=128)
parser.add_argument("--out", required=True)
parser.add_argument("--reject-topk", type=int, default=1)  # SED's TEST.TOPK
parser.add_argument("--compile-decoder", action="store_true")
args = parser.parse_args()
ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731

# one run: whole model, trunk, decoder, chunked decoder and early rejection, so ratios are fair
run = bench_model(
    args.encoder,
    args.size,
    ints(args.classes),
    ints(args.batches),
    args.dtype,
    args.device,
    warmup=3,
    repeats=10,
    class_chunk=args.chunk,
    reject_topk=args.reject_topk,
    compile_decoder=args.compile_decoder,
)
atomic_write_json(args.out, run)
header = ("batch", "classes", "ms/img", "trunk", "decoder", "chunked", "reject", "peak MiB")
print("".join(f"{h:>10}" for h in header))
for r in run["results"]:
    print(
        f"{r['batch']:>10}{r['classes']:>10}{r['model_ms_per_image']:>10.2f}{r['trunk_ms_per_image']:>10.2f}"
        f"{r['decoder_ms_per_image']:>10.2f}{r['decoder_chunked_ms'] / r['batch']:>10.2f}"
        f"{r['decoder_reject_ms'] / r['batch']:>10.2f}{r['peak_mem_mib_model']:>10.0f}"
    )
print(json.dumps({"device": run["device"], "torch": run["torch"], "scaling": run["scaling"]}))
