"""bfloat16 x bfloat16 -> float32 GEMMs on AVX512_BF16, and float32 GEMMs on AVX-512F: packing,
cache blocking, both threads.

Legend: one GEMM is C (P, Q) float32 = A (P, R) B (R, Q), bfloat16 operands handled as their uint16
bit patterns (as in npcpu.kernels.convert), R summed in pairs (npcpu.kernels.dpbf16), so an odd R
is padded with a zero pair half. Products and sums are float32; beta = 0 overwrites C (never reads
it: NaN there does not reach the result), beta = 1 accumulates into it.

The microkernel (dpbf16.tile) needs
- A as 32-bit words, (A[p, 2r], A[p, 2r+1]) at a_words[p * a_row_step + r * a_pair_step]: a view of
  a row-major bfloat16 matrix whose rows hold the pairs (no copy), or the rows of another matrix
  interleaved in pairs (`interleave_rows`) when the pairs run down its columns;
- B packed in panels of COLUMNS columns: panel j, pair r, column c at
  ((j * pairs) + r) * COLUMNS + c, made either from a matrix whose pairs run down its columns
  (rows 2r and 2r+1 interleaved) or from the transpose of one whose rows hold the pairs (a
  transpose of 32-bit words); all of B at once (`pack_panels`) or a block at a time in each task.

The three GEMMs of a linear layer, x (N, K), W (M, K), dz (N, M) (npcpu.blas_native.bf16):

    y   = x W^T   as y^T (M, N) = W x^T     A = W's rows as words (no copy), B = x's words, packed
                  (N < K), else as y = x W^T  A = x's rows as words, B = W's words, packed
    dx  = dz W    (N, K)                    A = dz's rows as words, B = W's rows 2r, 2r+1, packed
    dW += dz^T x  (M, K)                    A = dz's rows interleaved, B = x's rows interleaved, packed
                  (K <= M), else as dW^T += x^T dz: A = x's rows interleaved, B = dz's, packed
W is packed a block at a time inside each task, never all at once: in dx always (each block of
rows of C packs it again, which costs less than reading back a packed copy of W), in forward
where C has one block of rows (else it is packed whole up front).

float32: the same code with one float32 in place of each 32-bit pair word (the tile then runs
vfmadd231ps, npcpu.kernels.dpbf16): A is read in place as a float32 matrix (rows of A at
a_row_step, its R elements at a_pair_step: dz^T for dW is dz itself, a_row_step 1 and a_pair_step
M, no copy), B packs one float32 per "pair", and nothing is padded. The packing reads its words
through `_pair_rows` / `_word_of` / `_words_of_panel` / `_word_along`, which Numba specializes by
the source's dtype: uint16 bfloat16 bits make pairs, float32 values are their own words. Numba
compiles each caller once per word type.

Blocking: each task of the parallel loop owns a block of at most BLOCK_ROWS x BLOCK_COLUMNS of C
(`_block_shape`: blocks as even as the tiles allow, so that both threads finish together) and walks
R in steps of BLOCK_PAIRS. The B block of a step (BLOCK_PAIRS x BLOCK_COLUMNS words, in L2) is taken
a panel at a time (BLOCK_PAIRS x COLUMNS words, in L1), each panel serving every row tile of A of
the task. While the tiles compute, C's rows (last step) or the next step's B rows (packed per task)
are prefetched, so that neither C's read-modify-write nor the packing waits for memory.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types, uint32
from numba.extending import intrinsic, overload

from npcpu.kernels import dpbf16
from npcpu.kernels.dpbf16 import COLUMNS, ROWS
from npcpu.kernels.intrinsics import prefetch

BLOCK_PAIRS = 256               # pairs of R per step: a panel of B is 32 KB
BLOCK_ROWS = 16 * ROWS          # rows of C per task (at most)
BLOCK_COLUMNS = 8 * COLUMNS     # columns of C per task: a B block is 256 KB
_SHIFT = uint32(16)
_BITS_PANEL = ir.VectorType(ir.IntType(16), COLUMNS)     # a panel row of bfloat16 bits,
_WORDS_PANEL = ir.VectorType(ir.IntType(32), COLUMNS)    # of their pair words,
_FLOATS_PANEL = ir.VectorType(ir.FloatType(), COLUMNS)   # of float32 words
_HALF_SHIFT = ir.Constant(_WORDS_PANEL, [16] * COLUMNS)


# ------------------------------------------------------------------------------- packing


@njit(inline="always", cache=True)
def _pair(low, high):
    """The 32-bit word of a bfloat16 pair: `low` first in memory (little-endian)."""
    return uint32(low) | (uint32(high) << _SHIFT)


def _span(source):
    """Elements of `source` per word: 2 for bfloat16 bits (uint16), 1 for float32."""


def _pair_rows(source, r):
    """The rows of `source` whose elements make word r of each column (the words running down its
    columns): rows 2r and 2r + 1 for bfloat16 bits (an all-zero row past the last), row r (twice)
    for float32."""


def _word_of(low, high, q):
    """Word q of the rows of _pair_rows: (low[q], high[q]) for bfloat16 bits, low[q] for float32."""


def _word_along(row, r):
    """Word r of a 1-D `row`: (row[2r], row[2r + 1]) for bfloat16 bits, a zero half past its end;
    row[r] for float32."""


@overload(_span)
def _span_specialized(source):
    if source.dtype == types.uint16:
        return lambda source: 2
    if source.dtype == types.float32:
        return lambda source: 1
    return None


@overload(_pair_rows)
def _pair_rows_specialized(source, r):
    if source.dtype == types.uint16:
        def rows(source, r):
            low = source[2 * r]
            return low, source[2 * r + 1] if 2 * r + 1 < source.shape[0] else np.zeros_like(low)
        return rows
    if source.dtype == types.float32:
        return lambda source, r: (source[r], source[r])
    return None


@overload(_word_of)
def _word_of_specialized(low, high, q):
    if low.dtype == types.uint16:
        return lambda low, high, q: _pair(low[q], high[q])
    if low.dtype == types.float32:
        return lambda low, high, q: low[q]
    return None


@overload(_word_along)
def _word_along_specialized(row, r):
    if row.dtype == types.uint16:
        return lambda row, r: _pair(row[2 * r], row[2 * r + 1] if 2 * r + 1 < row.size else 0)
    if row.dtype == types.float32:
        return lambda row, r: row[r]
    return None


def word_dtype(source: np.ndarray) -> np.dtype:
    """The dtype of the words packed from `source`: uint32 pairs of bfloat16 bits, or float32."""
    return np.dtype(np.uint32) if source.dtype == np.uint16 else np.dtype(np.float32)


def _vector_at(context, builder, array_type, array, index_type, index, vector_type):
    """An LLVM pointer to the vector_type that starts at array[index] (1-D, C-contiguous)."""
    data = context.make_array(array_type)(context, builder, array).data
    index = context.cast(builder, index, index_type, types.intp)
    return builder.bitcast(builder.gep(data, [index]), vector_type.as_pointer())


@intrinsic
def _words_of_panel(typingctx, low, high, q, out, start):
    """out[start + c] = _word_of(low, high, q + c) for c < COLUMNS, in whole vectors: bfloat16
    bits as two loads of COLUMNS halves, zero-extended, high's shifted up and or-ed into low's;
    float32 as one load of low's values; then one store of COLUMNS words. low, high: rows of
    _pair_rows; low, high and out C-contiguous.

    The loop Numba would write instead is not vectorized: LLVM cannot tell that `out` does not
    overlap the rows, and unrolls it into COLUMNS scalar words."""
    bits = low.dtype == types.uint16
    if ((low.dtype, out.dtype) not in ((types.uint16, types.uint32), (types.float32, types.float32))
            or high != low or low.layout != "C" or out.layout != "C"):
        return None

    def codegen(context, builder, signature, args):
        (low_type, _, q_type, out_type, start_type), (low, high, q, out, start) = (
            signature.args, args)

        def load(row, vector_type, align):
            pointer = _vector_at(context, builder, low_type, row, q_type, q, vector_type)
            return builder.load(pointer, align=align)

        if bits:
            low_bits, high_bits = (builder.zext(load(row, _BITS_PANEL, 2), _WORDS_PANEL)
                                   for row in (low, high))
            words = builder.or_(low_bits, builder.shl(high_bits, _HALF_SHIFT))
        else:
            words = load(low, _FLOATS_PANEL, 4)
        target = _vector_at(context, builder, out_type, out, start_type, start, words.type)
        builder.store(words, target, align=4)
        return context.get_dummy_value()

    return types.void(low, high, q, out, start), codegen


@njit(cache=True)
def _pack_row_pairs_block(source, pair_start, pair_stop, column_start, column_stop, out):
    """out[((j * n) + r) * COLUMNS + c] = word pair_start + r of column q of `source` (C-contiguous,
    the words running down its columns, _pair_rows), with q = column_start + j * COLUMNS + c and
    n = pair_stop - pair_start; columns past source's end are zero.

    A pass per word row: its source rows are read along their memory, whole cache lines, into
    every panel of the block, a panel row as whole vectors (_words_of_panel); only the last
    panel, where it runs past source's last column, goes word by word."""
    n_pairs = pair_stop - pair_start
    n_panels = (column_stop - column_start + COLUMNS - 1) // COLUMNS
    full_panels = min(n_panels, (source.shape[1] - column_start) // COLUMNS)
    for r in range(n_pairs):
        low, high = _pair_rows(source, pair_start + r)
        for j in range(full_panels):
            _words_of_panel(low, high, column_start + j * COLUMNS, out,
                            (j * n_pairs + r) * COLUMNS)
        for j in range(full_panels, n_panels):
            q0, base = column_start + j * COLUMNS, (j * n_pairs + r) * COLUMNS
            width = source.shape[1] - q0
            for c in range(COLUMNS):
                out[base + c] = _word_of(low, high, q0 + c) if c < width else 0


@njit(cache=True)
def _pack_word_columns_block(source, pair_start, pair_stop, column_start, column_stop, out):
    """As _pack_row_pairs_block for B = source^T, source (Q, L) holding the words in its rows:
    out[((j * n) + r) * COLUMNS + c] = _word_along(source[q], pair_start + r),
    q = column_start + j * COLUMNS + c; columns past source's rows are zero."""
    n_columns = source.shape[0]
    n_pairs = pair_stop - pair_start
    for j in range((column_stop - column_start + COLUMNS - 1) // COLUMNS):
        q0 = column_start + j * COLUMNS
        panel = out[j * n_pairs * COLUMNS:(j + 1) * n_pairs * COLUMNS]
        for c in range(COLUMNS):
            if q0 + c >= n_columns:
                for r in range(n_pairs):
                    panel[r * COLUMNS + c] = 0
                continue
            row = source[q0 + c]
            for r in range(n_pairs):
                panel[r * COLUMNS + c] = _word_along(row, pair_start + r)


@njit(cache=True)
def _pack_block(source, pairs_down_columns, pair_start, pair_stop, column_start, column_stop, out):
    if pairs_down_columns:
        _pack_row_pairs_block(source, pair_start, pair_stop, column_start, column_stop, out)
    else:
        _pack_word_columns_block(source, pair_start, pair_stop, column_start, column_stop, out)


def pack_panels(source: np.ndarray, pairs_down_columns: bool) -> np.ndarray:
    """All of B in panels (the layout of the module docstring), from a bfloat16 (uint16 bits) or
    float32 source: B = source (R, Q) with `pairs_down_columns` (for bfloat16, rows 2r, 2r + 1
    interleaved), else B = source^T, source (Q, R) holding the words in its rows (a transpose of
    32-bit words)."""
    source = np.ascontiguousarray(source)
    n_rows, n_columns = source.shape if pairs_down_columns else source.shape[::-1]
    span = 2 if source.dtype == np.uint16 else 1
    n_pairs, n_panels = (n_rows + span - 1) // span, (n_columns + COLUMNS - 1) // COLUMNS
    out = np.empty(n_panels * n_pairs * COLUMNS, word_dtype(source))
    # a task per BLOCK_COLUMNS of B (as gemm's tasks pack it), fewer where a thread would get
    # under two tasks
    per_task = max(1, min(BLOCK_COLUMNS // COLUMNS, n_panels // (2 * numba.get_num_threads())))
    _pack_all_panels(source, pairs_down_columns, n_pairs, n_panels, per_task, out)
    return out


@njit(parallel=True, cache=True)
def _pack_all_panels(source, pairs_down_columns, n_pairs, n_panels, per_task, out):
    """pack_panels' packing, `per_task` panels per task."""
    for task in prange((n_panels + per_task - 1) // per_task):
        first, stop = task * per_task, min(n_panels, (task + 1) * per_task)
        _pack_block(source, pairs_down_columns, 0, n_pairs, first * COLUMNS, stop * COLUMNS,
                    out[first * n_pairs * COLUMNS:stop * n_pairs * COLUMNS])


@njit(parallel=True, cache=True)
def interleave_rows(source):
    """(ceil(L / 2), Q) words of a bfloat16 source (L, Q): out[r, q] = (source[2r, q],
    source[2r + 1, q]), a zero half past the last row."""
    n_rows, n_columns = source.shape
    out = np.empty(((n_rows + 1) // 2, n_columns), np.uint32)
    for r in prange(n_rows // 2):
        low, high = source[2 * r], source[2 * r + 1]
        for q in range(n_columns):
            out[r, q] = _pair(low[q], high[q])
    if n_rows % 2:
        for q in range(n_columns):
            out[-1, q] = _pair(source[n_rows - 1, q], 0)
    return out


# ------------------------------------------------------------------------------- the GEMM


@njit(cache=True)
def _write_block(c, block, p_start, q_start, row_tiles, panels, accumulate):
    """C (+)= a task's block of tiles, tile (t, j) of rows p_start + t ROWS and columns
    q_start + j COLUMNS at block[(t * panels + j) * ROWS * COLUMNS], ROWS x COLUMNS row-major;
    only the part inside C. Walks C along its memory (a transposed C, as y^T, column by column)."""
    row_major = c.strides[0] >= c.strides[1]
    for t in range(row_tiles):
        p0 = p_start + t * ROWS
        rows = min(ROWS, c.shape[0] - p0)
        for j in range(panels):
            q0 = q_start + j * COLUMNS
            columns = min(COLUMNS, c.shape[1] - q0)
            tile = block[(t * panels + j) * ROWS * COLUMNS:(t * panels + j + 1) * ROWS * COLUMNS]
            if row_major:
                for i in range(rows):
                    c_row = c[p0 + i, q0:q0 + columns]
                    tile_row = tile[i * COLUMNS:i * COLUMNS + columns]
                    for k in range(columns):
                        c_row[k] = c_row[k] + tile_row[k] if accumulate else tile_row[k]
            else:
                for k in range(columns):
                    c_column = c[p0:p0 + rows, q0 + k]
                    for i in range(rows):
                        value = tile[i * COLUMNS + k]
                        c_column[i] = c_column[i] + value if accumulate else value


@njit(cache=True)
def _prefetch_part(matrix, row_start, row_stop, column_start, column_stop, part, parts):
    """Start loading part `part` of `parts` of matrix[row_start:row_stop, column_start:column_stop]
    (split by rows) into the caches, for a row-major matrix (nothing for another layout): the
    tiles computed meanwhile hide the wait for memory that C's read-modify-write and the packing
    of B would otherwise stand still for."""
    if matrix.strides[1] != matrix.itemsize or column_stop <= column_start:
        return
    per_line = 64 // matrix.itemsize
    share = (row_stop - row_start + parts - 1) // parts
    first = row_start + part * share
    for row in range(first, min(row_stop, first + share)):
        line = matrix[row, column_start:column_stop]
        for k in range(0, line.size, per_line):
            prefetch(line, k)
        prefetch(line, line.size - 1)


@njit(cache=True)
def _ceil_div(a, b):
    return (a + b - 1) // b


@njit(cache=True)
def _block_shape(n_rows, n_columns, threads):
    """(rows, columns) of C per task, multiples of ROWS and COLUMNS, at most BLOCK_ROWS x
    BLOCK_COLUMNS, splitting C into blocks as even as the tiles allow: at least two tasks per
    thread, and a task count that is a multiple of the thread count where C has the rows for it.
    The parallel loop hands each thread an equal share of the tasks, so uneven blocks (a last
    block of a few rows) would leave one thread waiting for the other."""
    panels = _ceil_div(n_columns, COLUMNS)
    column_blocks = _ceil_div(panels, BLOCK_COLUMNS // COLUMNS)
    row_tiles = _ceil_div(n_rows, ROWS)
    wanted = min(row_tiles, max(_ceil_div(row_tiles, BLOCK_ROWS // ROWS),
                                _ceil_div(2 * threads, column_blocks)))
    tiles_per_block = _ceil_div(row_tiles, wanted)
    for row_blocks in range(wanted, row_tiles + 1):  # the fewest blocks that the threads share
        per_block = _ceil_div(row_tiles, row_blocks)
        if (_ceil_div(row_tiles, per_block) * column_blocks) % threads == 0:
            tiles_per_block = per_block
            break
    return ROWS * tiles_per_block, COLUMNS * _ceil_div(panels, column_blocks)


@njit(parallel=True, cache=True)
def gemm(c, beta, a_words, a_row_step, a_pair_step, n_pairs, b_panels, b_source,
         b_pairs_down_columns, threads):
    """C (P, Q) = beta C + A B, float32 C (any layout), beta 0 or 1.

    A: a_words as in the module docstring (flat, uint32 bfloat16 pairs or float32). B: `b_panels`
    (flat, of a_words' dtype, all of B packed, pack_panels) when it is not empty, else packed from
    `b_source` as pack_panels does (b_pairs_down_columns), a block at a time inside each task.
    Each task sums its block of C over all of R in a block of its own, then adds it to C once.
    threads: Numba's thread count (the tasks are sized to give each thread at least two).
    """
    n_rows, n_columns = c.shape
    block_rows, block_columns = _block_shape(n_rows, n_columns, threads)
    row_blocks, column_blocks = _ceil_div(n_rows, block_rows), _ceil_div(n_columns, block_columns)
    packed = b_panels.size > 0
    for task in prange(row_blocks * column_blocks):
        p_start = (task // column_blocks) * block_rows
        q_start = (task % column_blocks) * block_columns
        p_stop, q_stop = min(n_rows, p_start + block_rows), min(n_columns, q_start + block_columns)
        panels = (q_stop - q_start + COLUMNS - 1) // COLUMNS
        row_tiles = (p_stop - p_start + ROWS - 1) // ROWS
        block = np.empty(row_tiles * panels * ROWS * COLUMNS, np.float32)
        b_block = np.empty(0 if packed else panels * BLOCK_PAIRS * COLUMNS, b_panels.dtype)
        for r_start in range(0, n_pairs, BLOCK_PAIRS):
            r_count = min(BLOCK_PAIRS, n_pairs - r_start)
            if not packed:
                _pack_block(b_source, b_pairs_down_columns, r_start, r_start + r_count, q_start,
                            q_stop, b_block)
            last_step = r_start + BLOCK_PAIRS >= n_pairs
            next_rows = _span(b_source) * (r_start + BLOCK_PAIRS)
            next_stop = min(next_rows + _span(b_source) * BLOCK_PAIRS, b_source.shape[0])
            for j in range(panels):  # a panel of B stays in L1 while the row tiles of A pass
                if last_step:  # C's block, for _write_block
                    _prefetch_part(c, p_start, p_stop, q_start, q_stop, j, panels)
                elif not packed:  # the B rows the next step packs
                    _prefetch_part(b_source, next_rows, next_stop, q_start, q_stop, j, panels)
                if packed:
                    b_data = b_panels
                    b_start = ((q_start // COLUMNS + j) * n_pairs + r_start) * COLUMNS
                else:
                    b_data, b_start = b_block, j * r_count * COLUMNS
                for t in range(row_tiles):
                    p0 = p_start + t * ROWS
                    dpbf16.tile(a_words, p0 * a_row_step + r_start * a_pair_step, a_row_step,
                                a_pair_step, min(ROWS, n_rows - p0), b_data, b_start, r_count,
                                block, (t * panels + j) * ROWS * COLUMNS, r_start > 0)
        _write_block(c, block, p_start, q_start, row_tiles, panels, beta != 0)
