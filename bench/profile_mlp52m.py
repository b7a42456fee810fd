"""Where an mlp52m training step spends its time: each phase timed inside real steps.

    python bench/profile_mlp52m.py [--precision fp32|bf16] [--bf16-gemm auto|native|widened]
                                   [--update-in-backward] [--steps 8] [--threads N]

The step is bench_train's (workloads.npcpu_mlp52m_step: "npcpu fp32", "npcpu bf16", "npcpu bf16,
Adam in backward"): forward, cross-entropy, backward, Adam step, zero_grad. The GEMM calls of
npcpu.nn.weight_blocks (npcpu.blas, or npcpu.blas_native.bf16 on the native bf16 path), the bf16 widening
(widened path) or rounding of x and dz to bf16 (native path) and each optimizer update are wrapped
with timers for the profiled steps; "other" is the rest of the step (bias/ReLU/mask passes, the
loss, Python). The same run also times the step's GEMMs alone as the roofline does
(bench/roofline.py: each float32 GEMM by itself, fastest of several): the difference is how much
slower the same GEMMs run inside the step (for fp32; the roofline's GEMMs are float32 sgemm).
Medians over the profiled steps; one process, so run it a few times on a noisy machine.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import workloads as wl
from common import markdown_table


def _timed(totals: collections.Counter, name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        totals[name] += time.perf_counter() - start
        return result
    return wrapper


def profile_steps(precision: str, update_in_backward: bool, steps: int,
                  bf16_gemm: str = "auto") -> dict[str, list[float]]:
    """Milliseconds per phase of each of `steps` profiled steps (after 2 warm-up steps)."""
    from npcpu import backend, blas, blas_native
    from npcpu.kernels import convert
    from npcpu.optim.adam import Adam

    backend.set_bf16_gemm(bf16_gemm)
    train_step = wl.npcpu_mlp52m_step(precision, update_in_backward)

    totals: collections.Counter = collections.Counter()
    wrapped = {  # (module, attribute) -> phase
        **{(gemms, "matmul_weight_transposed"): "forward GEMMs" for gemms in (blas, blas_native.bf16)},
        **{(gemms, "matmul_weight"): "dx GEMMs" for gemms in (blas, blas_native.bf16)},
        **{(gemms, "accumulate_weight_grad"): "dW GEMMs" for gemms in (blas, blas_native.bf16)},
        (convert, "bf16_to_f32"): "bf16 widening",
        (convert, "f32_to_bf16"): "bf16 rounding",
    }
    originals = {key: getattr(*key) for key in wrapped}
    update = Adam._update  # what step() and the updates inside backward both call, per tensor

    per_step = collections.defaultdict(list)
    try:
        for step in range(steps + 2):
            if step == 2:  # warm-up done: start timing phases
                for (module, name), phase in wrapped.items():
                    setattr(module, name, _timed(totals, phase, originals[(module, name)]))
                Adam._update = _timed(totals, "Adam updates", update)
            totals.clear()
            start = time.perf_counter()
            train_step()
            total = time.perf_counter() - start
            if step >= 2:
                per_step["step"].append(1e3 * total)
                for phase in (*dict.fromkeys(wrapped.values()), "Adam updates"):
                    per_step[phase].append(1e3 * totals[phase])
                per_step["other"].append(1e3 * (total - sum(totals.values())))
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)
        Adam._update = update
    return per_step


def gemms_alone_ms(repeats: int) -> float:
    """The roofline's GEMM time: each of the step's GEMMs timed alone, fastest of `repeats`, summed."""
    from roofline import gemm_times
    return sum(row["ms"] for row in gemm_times(repeats))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--bf16-gemm", choices=("auto", "native", "widened"), default="auto",
                        help="the GEMM path under bf16 (npcpu.backend.set_bf16_gemm)")
    parser.add_argument("--update-in-backward", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="BLAS and Numba threads "
                        "(default: all cores)")
    args = parser.parse_args(argv)
    from npcpu import backend  # OPENBLAS_THREAD_TIMEOUT, threading layer, as in training
    backend.set_threads(args.threads)
    per_step = profile_steps(args.precision, args.update_in_backward, args.steps, args.bf16_gemm)
    median = {phase: statistics.median(values) for phase, values in per_step.items()}
    rows = [[phase, f"{ms:.1f}", f"{ms / median['step']:.0%}"] for phase, ms in median.items()
            if phase != "step" and ms > 0.05]
    rows.append(["step", f"{median['step']:.1f}", "100%"])
    print(markdown_table(["phase", "median ms/step", "share"], rows))
    in_step = sum(median[p] for p in ("forward GEMMs", "dx GEMMs", "dW GEMMs"))
    alone = gemms_alone_ms(5)
    print(f"\nthe same GEMMs alone (the roofline's): {alone:.1f} ms; inside the step: "
          f"{in_step:.1f} ms ({in_step / alone:.2f}x)")


if __name__ == "__main__":
    main()
