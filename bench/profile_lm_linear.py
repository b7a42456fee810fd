"""Where gpt-char's Linear layers spend their time, piece by piece, and the fused epilogues against
the separate passes they replace, alternating in one process.

    python bench/profile_lm_linear.py [--threads 2] [--repeats 15] [--calls 20]

Shapes are gpt-char's (--preset gpt-char: batch 12 x block 64 = 768 rows, n_embd 128, 4 layers,
vocabulary 65): per step, 4 x (c_attn 128 -> 384, attn c_proj 128 -> 128, c_fc 128 -> 512, mlp
c_proj 512 -> 128) and lm_head 128 -> 65 without bias. Each piece is timed by itself on the float32
GEMM path chosen (npcpu info): the packing of each GEMM's B operand, the GEMM itself (packing
included), the bias add and bias gradient passes, GELU's two passes; then the layer's forward and
backward as the layer runs it. "per step" multiplies by the layer count. Medians of `repeats`
rounds of `calls` calls each, the candidates alternating.
"""

from __future__ import annotations

import argparse
import statistics

import numba
import numpy as np

from common import markdown_table, time_interleaved

ROWS = 768
LAYERS = {  # name: (in, out, bias, uses per step)
    "c_attn": (128, 384, True, 4),
    "attn c_proj": (128, 128, True, 4),
    "c_fc": (128, 512, True, 4),
    "mlp c_proj": (512, 128, True, 4),
    "lm_head": (128, 65, False, 1),
}


def _ms(times: list[float], calls: int) -> float:
    return 1e3 * statistics.median(times) / calls


def _repeat(fn, calls):
    def run():
        for _ in range(calls):
            fn()
    return run


def pieces(repeats: int, calls: int) -> list[list]:
    """Rows of (layer, piece, ms per call, ms per step)."""
    from npcpu import blas
    from npcpu.kernels import activations, gemm_bf16
    from npcpu.kernels import linear as kernels

    rng = np.random.default_rng(0)
    rows = []
    for name, (k, m, bias, uses) in LAYERS.items():
        x = rng.standard_normal((ROWS, k)).astype(np.float32)
        w = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal(m).astype(np.float32)
        dz = rng.standard_normal((ROWS, m)).astype(np.float32)
        grad = np.zeros((m, k), np.float32)
        y = np.empty((ROWS, m), np.float32)
        candidates = {
            "pack W (forward)": lambda: gemm_bf16.pack_panels(w, False),
            "pack W (dx)": lambda: gemm_bf16.pack_panels(w, True),
            "pack x (dW)": lambda: gemm_bf16.pack_panels(x, True),
            "GEMM y = x W^T": lambda: blas.matmul_weight_transposed(x, w),
            "GEMM dx = dz W": lambda: blas.matmul_weight(dz, w),
            "GEMM dW += dz^T x": lambda: blas.accumulate_weight_grad(grad, dz, x),
        }
        if bias:
            candidates["bias add pass"] = lambda: kernels.add_bias(y, b)
            candidates["bias grad pass"] = lambda: kernels.bias_grad(dz, b.copy())
            candidates["GEMM y = x W^T + b (epilogue)"] = (
                lambda: blas.matmul_weight_transposed(x, w, bias=b))
        if name == "c_fc":
            h, flat_y = np.empty_like(y), y.reshape(-1)
            candidates["GELU forward pass"] = lambda: activations.gelu_forward(flat_y, h.reshape(-1))
            candidates["GELU backward pass"] = (
                lambda: activations.gelu_backward(flat_y, dz.reshape(-1), h.reshape(-1)))
            candidates["GEMM z, gelu(z) (epilogue)"] = (
                lambda: blas.matmul_weight_transposed(x, w, bias=b, activation="gelu",
                                                      activation_out=h))
        if name == "mlp c_proj":
            z = rng.standard_normal((ROWS, k)).astype(np.float32)
            dy = rng.standard_normal((ROWS, m)).astype(np.float32)
            candidates["GEMM dx * gelu'(z) (epilogue)"] = (
                lambda: blas.matmul_weight(dy, w, activation="gelu", activation_input=z))
        times = time_interleaved({piece: _repeat(fn, calls) for piece, fn in candidates.items()},
                                 repeats)
        for piece, seconds in times.items():
            rows.append([name, piece, _ms(seconds, calls), _ms(seconds, calls) * uses])
    return rows


def mlp_ab(repeats: int, calls: int) -> list[list]:
    """The MLP's forward + backward, fused (this branch's MLP) against Linear, GELU, Linear."""
    from npcpu.nn import GELU, MLP, Linear

    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, 64, 128)).astype(np.float32)
    dout = rng.standard_normal((12, 64, 128)).astype(np.float32)
    fused = MLP(128)
    fused.input_requires_grad = True
    c_fc, gelu, c_proj = Linear(128, 512), GELU(), Linear(512, 128)
    for layer in (c_fc, gelu, c_proj):
        layer.input_requires_grad = True

    def fused_step():
        fused.forward(x)
        fused.backward(dout)

    def unfused_step():
        c_proj.forward(gelu.forward(c_fc.forward(x)))
        c_fc.backward(gelu.backward(c_proj.backward(dout)))

    times = time_interleaved({"MLP fused": _repeat(fused_step, calls),
                              "Linear, GELU, Linear": _repeat(unfused_step, calls)}, repeats)
    return [["MLP", piece, _ms(seconds, calls), _ms(seconds, calls) * 4]
            for piece, seconds in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    from npcpu import backend
    print(f"float32 GEMM: {backend.f32_gemm_reason()}; threads {numba.get_num_threads()}")
    rows = pieces(args.repeats, args.calls) + mlp_ab(args.repeats, args.calls)
    print(markdown_table(["layer", "piece", "ms per call", "ms per step"], rows))


if __name__ == "__main__":
    main()
