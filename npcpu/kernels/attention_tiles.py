"""Causal self-attention on the native float32 tile: each (batch, head) pair's products, softmax
and gradients in one parallel pass per direction.

Legend: B batch, T positions, H heads, D head size, G = B H pairs; query t sees keys 0 .. t
(no key/value cache: npcpu.nn.attention runs cached generation on its batched GEMMs). The
operands are the layer's own (B, T, .) arrays, C-contiguous float32, read and written in place:

    qkv  (B, T, 3, H, D)   c_attn's output (q, k, v side by side); dqkv the same for c_attn's
                           input gradient
    y    (B, T, H, D)      the merged heads, c_proj's input; dy the same for its gradient
    probs (B, H, T, T)     kept for backward, exactly 0 above the causal diagonal

forward, per pair (npcpu.nn.attention's module docstring has the math):

    probs = causal_softmax(scale * q k^T)           (T, T)
    y     = probs v                                 (T, D)

backward, per pair, from dy and the kept probs:

    dprobs  = dy v^T                                (T, T)
    dscores = scale * probs * (dprobs - rowsum(dprobs * probs))   (npcpu.kernels.attention)
    dv = probs^T dy,   dq = dscores k,   dk = dscores^T q

Every product runs on npcpu.kernels.dpbf16's tile (ROWS x COLUMNS of the result per call, float32
fused multiply-adds on zmm registers), whose A operand is read with any row and pair strides (so
probs, dscores and their transposes are read in place) and whose B operand is packed into rows of
COLUMNS floats; each tile of a result is copied into its rows of the (B, T, .) array (a head's
D values of a row are contiguous there). Per pair, q, k, v and dy are copied once into the
packed form:

    rows layout        X (R, D) -> panels (ceil(D / COLUMNS), R, COLUMNS): panel j, row r holds
                       X[r, j COLUMNS : (j + 1) COLUMNS], zero past D
    transposed layout  X (R, D) -> panels (ceil(R / COLUMNS), Dp, COLUMNS), Dp = D rounded up to
                       COLUMNS: panel j, row d holds X[j COLUMNS : (j + 1) COLUMNS, d], zero past R
                       (and past D)

Why one pass per pair instead of a batched GEMM per product: at T = 64, D = 32 a product is
131 072 multiply-adds, so the cost of a GEMM call, a thread hand-off per product and writing and
re-reading each (T, T) result through memory between the steps outweighs the arithmetic; here a
pair's operands and its (T, T) rows stay in the core's caches from the first product to the last,
and there is one parallel region per direction. The causal mask also skips work: a row tile of
queries reads only keys up to its last row's position (half of q k^T, probs v, dy v^T and
dscores k), and the transposed products (dv, dk) start at the first query that sees the tile's
keys.

Each product's multiply-adds run in the tile's order (one fused multiply-add per term, summed
along the shared index in increasing order), so a result equals BLAS sgemm's up to float32
rounding of a sum taken in another order.
"""

import numpy as np
from numba import njit, prange

from npcpu.kernels import dpbf16
from npcpu.kernels.attention import softmax_row, softmax_row_backward

ROWS, COLUMNS = dpbf16.ROWS, dpbf16.COLUMNS


@njit(cache=True)
def pack_rows(source, b, part, h, out):
    """X (R, D) = source[b, :, part, h] -> out (panels(D) R COLUMNS,): the rows layout."""
    rows, depth = source.shape[1], source.shape[4]
    for j in range((depth + COLUMNS - 1) // COLUMNS):
        width = min(COLUMNS, depth - j * COLUMNS)
        for r in range(rows):
            row, base = source[b, r, part, h], (j * rows + r) * COLUMNS
            for c in range(width):
                out[base + c] = row[j * COLUMNS + c]
            for c in range(width, COLUMNS):
                out[base + c] = 0.0


@njit(cache=True)
def pack_transposed(source, b, part, h, out):
    """X (R, D) = source[b, :, part, h] -> out (panels(R) Dp COLUMNS,): the transposed layout
    (rows of X become columns of the packed B, so that a product takes X^T as its B)."""
    rows, depth = source.shape[1], source.shape[4]
    padded = (depth + COLUMNS - 1) // COLUMNS * COLUMNS
    for j in range((rows + COLUMNS - 1) // COLUMNS):
        width = min(COLUMNS, rows - j * COLUMNS)
        block = out[j * padded * COLUMNS:(j + 1) * padded * COLUMNS]
        block[:] = 0.0
        for c in range(width):
            row = source[b, j * COLUMNS + c, part, h]
            for d in range(depth):
                block[d * COLUMNS + c] = row[d]


@njit(cache=True)
def _store(tile_out, dest, b, part, h, row0, rows, column0):
    """dest[b, row0 + i, part, h, column0 + c] = tile_out[i COLUMNS + c], the part of the tile
    inside dest (5-D, C-contiguous: each row written is contiguous, so the copy vectorizes)."""
    columns = min(COLUMNS, dest.shape[4] - column0)
    for i in range(rows):
        row = dest[b, row0 + i, part, h]
        for c in range(columns):
            row[column0 + c] = tile_out[i * COLUMNS + c]


@njit(cache=True)
def _rows_times_transposed(a_rows, b_transposed, depth, steps, tile_out, dest, g):
    """dest[g] (T, T) = A B^T for A, B (T, depth), from A's rows layout and B's transposed
    layout: q k^T and dy v^T, dest (G, T, 1, 1, T). Column tiles past a row tile's last row
    (causal: keys no row of the tile sees) are skipped, left unwritten (the softmax writes its
    zeros there)."""
    padded = (depth + COLUMNS - 1) // COLUMNS * COLUMNS
    for t0 in range(0, steps, ROWS):
        rows = min(ROWS, steps - t0)
        for j in range((t0 + rows + COLUMNS - 1) // COLUMNS):
            for p in range((depth + COLUMNS - 1) // COLUMNS):  # A's rows layout: one call a panel
                dpbf16.tile(a_rows, (p * steps + t0) * COLUMNS, COLUMNS, 1, rows, b_transposed,
                            (j * padded + p * COLUMNS) * COLUMNS, min(COLUMNS, depth - p * COLUMNS),
                            tile_out, 0, p > 0)
            _store(tile_out, dest, g, 0, 0, t0, rows, j * COLUMNS)


@njit(cache=True)
def _masked_times_rows(a, a_start, a_row_step, a_pair_step, transposed, b_rows, tile_out, dest,
                       b, part, h):
    """dest[b, :, part, h] (T, D) = A B for B (T, D) in rows layout and A (T, T) read in place,
    element (i, r) at a_start + i a_row_step + r a_pair_step: probs v and dscores k (A causal:
    row t is zero past key t), or, when `transposed`, probs^T dy and dscores^T q (A's row s is
    zero before query s). Each row tile sums only the pairs its rows can see."""
    steps, depth = dest.shape[1], dest.shape[4]
    for t0 in range(0, steps, ROWS):
        rows = min(ROWS, steps - t0)
        first, stop = (t0, steps) if transposed else (0, t0 + rows)
        for j in range((depth + COLUMNS - 1) // COLUMNS):
            dpbf16.tile(a, a_start + t0 * a_row_step + first * a_pair_step, a_row_step,
                        a_pair_step, rows, b_rows, (j * steps + first) * COLUMNS, stop - first,
                        tile_out, 0, False)
            _store(tile_out, dest, b, part, h, t0, rows, j * COLUMNS)


@njit(parallel=True, cache=True)
def attention_forward(qkv, probs, y, scale):
    """probs (B, H, T, T) = causal_softmax(scale * q k^T) and y = probs v, both written, for
    qkv (B, T, 3, H, D) (q, k, v side by side, c_attn's output) and y (B, T, H, D) (the merged
    heads, c_proj's input). All C-contiguous float32."""
    batch, steps, _, heads, depth = qkv.shape
    flat_probs = probs.reshape(-1)
    probs_rows = probs.reshape(batch * heads, steps, 1, 1, steps)
    y_heads = y.reshape(batch, steps, 1, heads, depth)
    d_panels, t_panels = (depth + COLUMNS - 1) // COLUMNS, (steps + COLUMNS - 1) // COLUMNS
    for g in prange(batch * heads):
        b, h = g // heads, g % heads
        q_rows = np.empty(d_panels * steps * COLUMNS, np.float32)
        k_transposed = np.empty(t_panels * d_panels * COLUMNS * COLUMNS, np.float32)
        v_rows = np.empty(d_panels * steps * COLUMNS, np.float32)
        tile_out = np.empty(ROWS * COLUMNS, np.float32)
        pack_rows(qkv, b, 0, h, q_rows)
        pack_transposed(qkv, b, 1, h, k_transposed)
        pack_rows(qkv, b, 2, h, v_rows)
        _rows_times_transposed(q_rows, k_transposed, depth, steps, tile_out, probs_rows, g)
        for t in range(steps):
            softmax_row(probs[b, h, t], t + 1, scale)
        _masked_times_rows(flat_probs, g * steps * steps, steps, 1, False, v_rows, tile_out,
                           y_heads, b, 0, h)


@njit(parallel=True, cache=True)
def attention_backward(dy, qkv, probs, dqkv, scale):
    """dqkv (B, T, 3, H, D) = (dq, dk, dv) side by side, written, from dy (B, T, H, D) and the
    forward's qkv and probs (module docstring). All C-contiguous float32."""
    batch, steps, _, heads, depth = qkv.shape
    flat_probs = probs.reshape(-1)
    dy_heads = dy.reshape(batch, steps, 1, heads, depth)
    d_panels, t_panels = (depth + COLUMNS - 1) // COLUMNS, (steps + COLUMNS - 1) // COLUMNS
    for g in prange(batch * heads):
        b, h = g // heads, g % heads
        dy_rows = np.empty(d_panels * steps * COLUMNS, np.float32)
        q_rows = np.empty(d_panels * steps * COLUMNS, np.float32)
        k_rows = np.empty(d_panels * steps * COLUMNS, np.float32)
        v_transposed = np.empty(t_panels * d_panels * COLUMNS * COLUMNS, np.float32)
        dscores = np.empty(steps * steps, np.float32)
        tile_out = np.empty(ROWS * COLUMNS, np.float32)
        pack_rows(dy_heads, b, 0, h, dy_rows)
        pack_rows(qkv, b, 0, h, q_rows)
        pack_rows(qkv, b, 1, h, k_rows)
        pack_transposed(qkv, b, 2, h, v_transposed)
        ds = dscores.reshape(steps, steps)
        # forward: y = probs v
        _rows_times_transposed(dy_rows, v_transposed, depth, steps, tile_out,
                               dscores.reshape(1, steps, 1, 1, steps), 0)
        _masked_times_rows(flat_probs, g * steps * steps, 1, steps, True, dy_rows, tile_out,
                           dqkv, b, 2, h)
        # forward: probs = causal_softmax(scale * scores)
        for t in range(steps):
            softmax_row_backward(ds[t], probs[b, h, t], t + 1, scale)
        # forward: scores = q k^T
        _masked_times_rows(dscores, 0, steps, 1, False, k_rows, tile_out, dqkv, b, 0, h)
        _masked_times_rows(dscores, 0, 1, steps, True, q_rows, tile_out, dqkv, b, 1, h)
