"""float32 <-> bfloat16/float16 conversion: npcpu's parallel Numba kernels against astype.

54M elements (the size of the mlp52m model), median of 5 runs each, in the current Numba/BLAS thread
count. "kernel" is the public function (it allocates its output, as astype does); "kernel, out
reused" writes into an array allocated once (`out=`), which shows how much of the time is page
faults of a fresh output. float16 rows compare with NumPy's (SIMD) astype.
Run: python bench/bench_convert.py [--elements N] [--repeats R]
"""

import argparse
import statistics
import time

import numba
import numpy as np

from npcpu.kernels import convert
from npcpu.precision import bfloat16


def median_seconds(function, repeats):
    function()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=54_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    x32 = np.random.default_rng(0).standard_normal(args.elements, dtype=np.float32)
    x16 = x32.astype(bfloat16)
    xf16 = x32.astype(np.float16)
    out16 = np.empty(args.elements, dtype=bfloat16)
    out32 = np.empty(args.elements, dtype=np.float32)
    rows = [
        ("f32 -> bf16", {
            "ml_dtypes astype": lambda: x32.astype(bfloat16),
            "kernel": lambda: convert.f32_to_bf16(x32),
            "kernel, out reused": lambda: convert.f32_to_bf16(x32, out=out16),
            "kernel, stochastic": lambda: convert.f32_to_bf16_stochastic(x32, 0),
        }),
        ("bf16 -> f32", {
            "ml_dtypes astype": lambda: x16.astype(np.float32),
            "kernel": lambda: convert.bf16_to_f32(x16),
            "kernel, out reused": lambda: convert.bf16_to_f32(x16, out=out32),
        }),
        ("f32 -> f16", {
            "numpy astype": lambda: x32.astype(np.float16),
            "kernel": lambda: convert.f32_to_f16(x32),
        }),
        ("f16 -> f32", {
            "numpy astype": lambda: xf16.astype(np.float32),
            "kernel": lambda: convert.f16_to_f32(xf16),
        }),
    ]
    threads = numba.get_num_threads()
    print(f"{args.elements:,} elements, median of {args.repeats}, {threads} Numba threads")
    print(f"{'conversion':<12} {'method':<20} {'ms':>8} {'astype / method':>16}")
    for conversion, methods in rows:
        baseline = None
        for method, function in methods.items():
            seconds = median_seconds(function, args.repeats)
            baseline = baseline or seconds
            print(f"{conversion:<12} {method:<20} {seconds * 1e3:8.2f} {baseline / seconds:16.2f}")


if __name__ == "__main__":
    main()
