"""The microkernel of the native bfloat16 GEMM: AVX512_BF16's `vdpbf16ps`, as an LLVM intrinsic.

`vdpbf16ps acc, a, b` takes 32 bfloat16 values in each of a and b, as 16 pairs, and adds to each of
the 16 float32 lanes of acc the dot product of its pair:

    acc[l] += a[2l] b[2l] + a[2l+1] b[2l+1]        l = 0..15, products and sum in float32

(it flushes bfloat16 subnormal inputs and float32 subnormal results to zero, and rounds to nearest
even; NaN and Inf propagate). A GEMM C (P, Q) = A (P, R) B (R, Q) uses it with the reduction index
in pairs: lane l of one zmm register holds the column q = q0 + l of a row of C, the pair
(B[2r, q], B[2r+1, q]) comes from a packed B, and the pair (A[p, 2r], A[p, 2r+1]) of one row of A,
one 32-bit word, is broadcast to all 16 lanes:

    for r in pairs:                                  ROWS x VECTORS accumulators stay in registers
        b_v = B_packed[r, 16v : 16v + 16]            VECTORS loads of 32 bfloat16
        for i in rows:
            a_i = broadcast(A_word(i, r))            one 32-bit broadcast load
            acc[i, v] = vdpbf16ps(acc[i, v], a_i, b_v)

ROWS x VECTORS = 28 accumulators, 2 B vectors and the broadcast fill the 32 zmm registers, and 28
independent dot products cover the latency of the instruction on two pipes.

Numba has no vector types, so `tile` below writes its loop directly as LLVM IR through
`numba.extending.intrinsic` (as npcpu.kernels.intrinsics does for prefetch and atomics). The
intrinsic is declared with its older integer-vector signature (<16 x i32> operands), which LLVM
upgrades to the bfloat one when it reads the module: llvmlite has no bfloat type. It compiles only
where LLVM targets a CPU with the instruction (npcpu.backend.use_native_bf16_gemm decides; nothing
calls it elsewhere).

The same tile serves the float32 GEMM (npcpu.backend.use_native_f32_gemm): given float32 operands,
each "pair" is one float32 of A (broadcast) and one row of B, and the multiply-add is AVX-512F's
`vfmadd231ps` (llvm.fma.v16f32):

    acc[l] += a b[l]                                 l = 0..15, one rounding (a fused multiply-add)

with the same register budget, layout and loop; the operands' dtype picks the instruction when
Numba compiles the caller (uint32 words: vdpbf16ps; float32: vfmadd231ps).
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

ROWS = 14      # rows of C per tile (broadcast words of A)
VECTORS = 2    # zmm registers across a row of the tile
LANES = 16     # float32 lanes per zmm register
COLUMNS = VECTORS * LANES  # columns of C per tile (B is packed this wide)

_F32X16 = ir.VectorType(ir.FloatType(), LANES)
_I32X16 = ir.VectorType(ir.IntType(32), LANES)
_I64 = ir.IntType(64)
_ZERO = ir.Constant(_F32X16, [0.0] * LANES)
_DPBF16PS = "llvm.x86.avx512bf16.dpbf16ps.512"
_FMA = "llvm.fma.v16f32"


def _dpbf16ps(builder):
    """acc, a, b -> vdpbf16ps(acc, a, b), on <16 x i32> pair words."""
    dot = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_F32X16, [_F32X16, _I32X16, _I32X16]), _DPBF16PS)
    return lambda acc, a, b: builder.call(dot, [acc, a, b])


def _fma(builder):
    """acc, a, b -> a * b + acc, one rounding, on <16 x float>."""
    fma = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_F32X16, [_F32X16] * 3), _FMA)
    return lambda acc, a, b: builder.call(fma, [a, b, acc])


def _multiply_add(builder, dtype):
    """The tile's multiply-add and its operands' vector type, for words of `dtype` (a Numba type):
    uint32 bfloat16 pairs or float32."""
    if dtype == types.float32:
        return _fma(builder), _F32X16
    return _dpbf16ps(builder), _I32X16


def _broadcast(builder, word, vector_type):
    vector = builder.insert_element(ir.Constant(vector_type, ir.Undefined), word,
                                    ir.Constant(_I64, 0))
    return builder.shuffle_vector(vector, vector, ir.Constant(_I32X16, [0] * LANES))


def _data(context, builder, array_type, array):
    return context.make_array(array_type)(context, builder, array).data


def _accumulate(builder, count, step, initial):
    """Emit `for k in range(count): accumulators = step(k, accumulators)` over ROWS * VECTORS
    float32 vectors that start at `initial`, and return their final values."""
    entry = builder.block
    loop = builder.append_basic_block("dpbf16_loop")
    done = builder.append_basic_block("dpbf16_done")
    builder.cbranch(builder.icmp_signed(">", count, _I64(0)), loop, done)
    builder.position_at_end(loop)
    k = builder.phi(_I64)
    accumulators = [builder.phi(_F32X16) for _ in range(ROWS * VECTORS)]
    updated = step(k, accumulators)
    k_next = builder.add(k, _I64(1))
    k.add_incoming(_I64(0), entry)
    k.add_incoming(k_next, loop)
    for phi, value, start in zip(accumulators, updated, initial):
        phi.add_incoming(start, entry)
        phi.add_incoming(value, loop)
    builder.cbranch(builder.icmp_signed("<", k_next, count), loop, done)
    builder.position_at_end(done)
    results = []
    for value, start in zip(updated, initial):
        result = builder.phi(_F32X16)
        result.add_incoming(start, entry)
        result.add_incoming(value, loop)
        results.append(result)
    return results


@intrinsic
def tile(typingctx, a_words, a_start, a_row_step, a_pair_step, rows, b_words, b_start, pairs, out,
         out_start, accumulate):
    """out[out_start + i * COLUMNS + c] (+)= sum over r < pairs of the pair dot products of A's
    row i and B's column c, for one ROWS x COLUMNS tile (+= when `accumulate`, else =).
    a_words and b_words are both uint32 (bfloat16 pairs, vdpbf16ps) or both float32 (one value
    per "pair", vfmadd231ps).

    a_words  (uint32, 1-D)  A's bfloat16 pairs as words: row i, pair r at
                            a_words[a_start + min(i, rows - 1) * a_row_step + r * a_pair_step]
                            (rows past `rows` repeat the last one, so they never read out of
                            bounds; their results are not used)
    b_words  (uint32, 1-D)  B packed: pair r of column c at b_words[b_start + r * COLUMNS + c]
    out      (float32, 1-D) ROWS * COLUMNS results from out_start, row-major
    """
    if (a_words.dtype not in (types.uint32, types.float32) or b_words.dtype != a_words.dtype
            or out.dtype != types.float32):
        return None

    def codegen(context, builder, signature, args):
        a_type, b_type, out_type = signature.args[0], signature.args[5], signature.args[8]
        a, a0, row_step, pair_step, n_rows, b, b0, n_pairs, c, c0, accumulate = args
        int64 = lambda v: context.cast(builder, v, types.intp, types.int64)  # noqa: E731
        a0, row_step, pair_step, n_rows, b0, n_pairs, c0 = map(
            int64, (a0, row_step, pair_step, n_rows, b0, n_pairs, c0))
        a_base = builder.gep(_data(context, builder, a_type, a), [a0])
        b_base = builder.gep(_data(context, builder, b_type, b), [b0])
        last_row = builder.sub(n_rows, _I64(1))
        row_pointers = []
        for i in range(ROWS):
            row = builder.select(builder.icmp_signed("<", _I64(i), n_rows), _I64(i), last_row)
            row_pointers.append(builder.gep(a_base, [builder.mul(row, row_step)]))
        dot, vector_type = _multiply_add(builder, a_type.dtype)

        def step(r, accumulators):
            b_pair = builder.bitcast(builder.gep(b_base, [builder.mul(r, _I64(COLUMNS))]),
                                     vector_type.as_pointer())
            b_vectors = [builder.load(builder.gep(b_pair, [_I64(v)]), align=4)
                         for v in range(VECTORS)]
            a_offset = builder.mul(r, pair_step)
            updated = []
            for i in range(ROWS):
                word = builder.load(builder.gep(row_pointers[i], [a_offset]), align=4)
                a_i = _broadcast(builder, word, vector_type)
                for v in range(VECTORS):
                    updated.append(dot(accumulators[i * VECTORS + v], a_i, b_vectors[v]))
            return updated

        out_vectors = builder.bitcast(builder.gep(_data(context, builder, out_type, c), [c0]),
                                      _F32X16.as_pointer())
        flag = context.cast(builder, accumulate, signature.args[10], types.boolean)
        initial = [builder.select(flag, builder.load(builder.gep(out_vectors, [_I64(k)]), align=4),
                                  _ZERO) for k in range(ROWS * VECTORS)]
        results = _accumulate(builder, n_pairs, step, initial)
        for k, vector in enumerate(results):
            builder.store(vector, builder.gep(out_vectors, [_I64(k)]), align=4)
        return context.get_dummy_value()

    return types.void(a_words, a_start, a_row_step, a_pair_step, rows, b_words, b_start, pairs,
                      out, out_start, accumulate), codegen


@intrinsic
def register_peak(typingctx, words, iterations, out):
    """`iterations` x ROWS x VECTORS multiply-add instructions on operands held in registers (the
    bench's measure of the instruction's peak: no loads in the loop); the accumulators are stored
    in out (float32, ROWS * COLUMNS) so that nothing is optimized away. words: uint32 (vdpbf16ps)
    or float32 (vfmadd231ps), >= 48."""
    def codegen(context, builder, signature, args):
        source, n, c = args
        n = context.cast(builder, n, types.intp, types.int64)
        dot, vector_type = _multiply_add(builder, signature.args[0].dtype)
        base = builder.bitcast(_data(context, builder, signature.args[0], source),
                               vector_type.as_pointer())
        b_vectors = [builder.load(builder.gep(base, [_I64(v)]), align=4) for v in range(VECTORS)]
        a_vector = builder.load(builder.gep(base, [_I64(VECTORS)]), align=4)

        def step(k, accumulators):
            return [dot(acc, a_vector, b_vectors[j % VECTORS])
                    for j, acc in enumerate(accumulators)]

        results = _accumulate(builder, n, step, [_ZERO] * (ROWS * VECTORS))
        pointer = builder.bitcast(_data(context, builder, signature.args[2], c), _F32X16.as_pointer())
        for k, vector in enumerate(results):
            builder.store(vector, builder.gep(pointer, [_I64(k)]), align=4)
        return context.get_dummy_value()

    return types.void(words, iterations, out), codegen
