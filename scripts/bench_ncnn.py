#!/usr/bin/env python3
"""Side-by-side CPU timing of Real-ESRGAN animevideov3 x4: sakuga (candle) vs ncnn.

Usage (from the repository root):

    pip install ncnn numpy
    python3 scripts/bench_ncnn.py [--side 256] [--runs 15] [--threads N]

Both engines upscale the same side x side frame with the same weights
(assets/models/upscale_models/realesr-animevideov3-x4.{param,bin}). sakuga runs inside
its criterion bench binary in line-protocol mode (SAKUGA_BENCH_STDIO=1, built with
`cargo bench`, i.e. the release profile); ncnn runs in this process. Runs are
interleaved (ncnn, sakuga, ncnn fp32, ...) so that both see the same machine load, and
medians are reported. ncnn is timed twice: with its default options (fp16 storage where
the CPU has it, packed layouts) and with fp32 storage and arithmetic, the setting the
numerics references were made with.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import ncnn
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "assets/models/upscale_models/realesr-animevideov3-x4"


def test_frame(side: int) -> np.ndarray:
    """A deterministic CHW float32 frame in [0, 1] (the numerics fixture's pattern)."""
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    x = 0.5 + 0.5 * np.sin(cols / 5)
    y = 0.5 + 0.5 * np.cos(rows / 7)
    z = 0.8 * (((cols // 8) + (rows // 8)) % 2) + 0.1
    return np.stack([x, y, z]).astype(np.float32)


def ncnn_runner(threads: int, fp32: bool):
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = threads
    if fp32:
        net.opt.use_fp16_packed = False
        net.opt.use_fp16_storage = False
        net.opt.use_fp16_arithmetic = False
        net.opt.use_bf16_storage = False
    net.load_param(str(MODEL.with_suffix(".param")))
    net.load_model(str(MODEL.with_suffix(".bin")))

    def run(frame: np.ndarray) -> float:
        started = time.perf_counter()
        with net.create_extractor() as ex:
            ex.input("data", ncnn.Mat(frame))
            ret, out = ex.extract("output")
            assert ret == 0, f"ncnn extract failed: {ret}"
            np.array(out)
        return (time.perf_counter() - started) * 1e3

    return run


class SakugaRunner:
    """Drives the bench binary's stdin/stdout protocol: `run` -> elapsed ms."""

    def __init__(self, side: int, threads: int):
        env = dict(os.environ, SAKUGA_BENCH_STDIO="1", SAKUGA_BENCH_SIDE=str(side),
                   RAYON_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            ["cargo", "bench", "-q", "-p", "sakuga-models", "--bench", "upscale"],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"sakuga bench did not start (said {line!r})")

    def __call__(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    frame = test_frame(args.side)
    ncnn_default = ncnn_runner(args.threads, fp32=False)
    ncnn_fp32 = ncnn_runner(args.threads, fp32=True)
    ncnn_default(frame)
    ncnn_fp32(frame)
    sakuga = SakugaRunner(args.side, args.threads)
    times = {"sakuga": [], "ncnn_default": [], "ncnn_fp32": []}
    try:
        for _ in range(args.runs):
            times["ncnn_default"].append(ncnn_default(frame))
            times["sakuga"].append(sakuga())
            times["ncnn_fp32"].append(ncnn_fp32(frame))
    finally:
        sakuga.close()

    medians = {name: statistics.median(values) for name, values in times.items()}
    gflop = 2 * 3 * 3 * (3 * 64 + 16 * 64 * 64 + 64 * 48) * args.side**2 / 1e9
    if args.json:
        print(json.dumps({"side": args.side, "runs": args.runs, "threads": args.threads,
                          "gflop": gflop, "median_ms": medians}))
    else:
        print(f"animevideov3 x4, {args.side}x{args.side}, {args.threads} threads, "
              f"{args.runs} interleaved runs, {gflop:.1f} GFLOP per frame")
        for name, ms in medians.items():
            print(f"  {name:13s} median {ms:8.1f} ms  ({gflop / ms * 1e3:5.1f} GFLOP/s)")
        ratio = medians["sakuga"] / medians["ncnn_default"]
        print(f"  sakuga / ncnn_default = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
