"""Training steps of a small MLP classifier inside one Numba call per thread (npcpu.train.compiled).

Legend: S samples in the data set, D input features, B batch size (n <= B rows in a batch),
L layers; layer l maps K = width[l] to M = width[l + 1] features; P = 2 L parameters (weight of
layer l is p = 2 l, its bias p = 2 l + 1); C = COLUMN_BLOCKS, T threads (T divides C).
    x (S, D), y (S,) int64 class labels, order (S,) int64: the epoch's sample order
    weight[l] (M, K) torch layout, bias[l] (M,) or (0,) when the layer has no bias
    act[l] (B, M) the output of layer l after its optional ReLU (layer 0 reads x[rows] directly)
    dz[l] (B, M) dL/d(pre-activation of layer l)

One step is the reference loop of npcpu (model.forward, CrossEntropyLoss, model.backward,
SGD.step, zero_grad):

    a_{l+1} = relu?(a_l W_l^T + b_l)                      forward, a_0 = x[batch rows]
    dz_L    = (softmax(a_L) - onehot(y)) / n              mean cross-entropy over the n rows
    dz_l    = dL/da_{l+1} * (a_{l+1} > 0)                 only after a ReLU (a > 0 exactly where z > 0)
    g_W     = dz_l^T a_l,   g_b = sum_rows dz_l           the gradients of this step only
    dL/da_l = dz_l W_l                                    not needed for l = 0
    W_l, b_l <- SGD(W_l, g_W), SGD(b_l, g_b)              torch.optim.SGD's rule, see `sgd_update`

The models this path is for spend nearly all their work in layer 0 (softmax regression 784 -> 10
is all layer 0), whose input is wide and whose output is narrow. Its two GEMMs split cleanly by
input column k: z_0 = sum over column blocks of x[:, block] W_0[:, block]^T, and g_W0[:, block] =
dz_0^T x[:, block] needs only the block's columns. So thread t owns the column blocks t, t + T, ...
of W_0 for good: it sums its blocks' part of z_0 for the batch, and the threads meet (a spin
barrier, npcpu.kernels.intrinsics). The rest of the step is row by row up to the gradient sums:
the batch's rows are cut into C row groups, thread t takes groups t, t + T, ..., adds the C
partial sums of its rows in block order and runs the bias, ReLU, the layers above, the loss and
their backward down to dz_0 for them, writing each group's gradients apart. The threads meet
again; each sums the groups' gradients in group order and updates its own copy of everything but
W_0 (the copies stay bitwise equal: same numbers, same order), then computes g_W0 from all rows
of dz_0 and updates W_0 for its own column blocks only. What crosses between cores per step is
the B x M partial sums, dz_0 and the small gradients above layer 0, never W_0 or its gradient;
the batch's rows are read from memory once and read again from the core's cache for g_W0. Every
sum runs in the same order for any T, so the results do not depend on the thread count. The
threads are plain Python threads running `train_worker` without the GIL: Numba's parallel
regions cost several microseconds to launch, the barrier well under one, and a step of such a
model is tens of microseconds. (Running the rest of the step on every thread for all rows, as a
first version did, spent about 10 of a 56 ms epoch on work the other thread repeated.)

The GEMMs are register-tiled loops over 4 rows at a time whose innermost loop runs over the
contiguous K dimension, so LLVM vectorizes it: for the layers this path is for (784 -> 10 at
batch 128 is 1M multiply-adds) they are faster than BLAS calls, which pay dispatch and packing
for each of the 3 GEMMs of a layer and step. `reassoc` lets LLVM keep several partial sums in a
dot product (the order of a float32 sum then differs from BLAS's, within float32 rounding);
`contract` fuses multiply-adds. Neither removes NaN or Inf: a diverged loss stays NaN.
"""

import numpy as np
from numba import njit

from npcpu.kernels.intrinsics import barrier_wait, prefetch

FAST = {"contract", "reassoc"}
ROW_TILE = 4  # rows that share each load of a weight row in the GEMMs below
BATCH_TILE = 16  # rows per tile of layer 0's GEMMs; the next tile's rows are prefetched
COLUMN_BLOCKS = 4  # layer 0's columns in blocks, summed in block order; threads divide it
CACHE_LINE = 64  # bytes


@njit(cache=True)
def prefetch_rows(a, rows, first, stop):
    """Prefetch every cache line of a[rows[i]] for first <= i < min(stop, rows.size)."""
    step = CACHE_LINE // a.itemsize
    for i in range(first, min(stop, rows.size)):
        row = a[rows[i]]
        for k in range(0, row.size, step):
            prefetch(row, k)


# ---------------------------------------------------------------------------------------------
# forward: out = relu?(a[rows] W^T + b)
# ---------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=FAST)
def linear_forward(a, rows, weight, bias, relu, out, first_col, stop_col):
    """out[i, m] = sum_k a[rows[i], k] weight[m, k] + bias[m], then max(., 0) when `relu`;
    the sum runs over first_col <= k < stop_col (all of K for a whole layer, a block of columns
    for a partial sum of layer 0).

    a (R, K) with rows (n,) indices into it; weight (M, K); bias (M,) or (0,) for none;
    out (>= n, M), rows 0..n-1 written (out[i] is the output of row rows[i]). Tiles of 4 rows x 2
    weight rows: 6 loads per 8 multiply-adds, 8 running sums (vectors, after LLVM vectorizes
    over k). The loops index slices from 0: a loop index that might be negative would make Numba
    check every index for wraparound, and LLVM would not vectorize.
    """
    n = rows.size
    n_out, width = weight.shape[0], stop_col - first_col
    zero = out.dtype.type(0)
    full_rows, full_outs = n - n % ROW_TILE, n_out - n_out % 2
    for i in range(0, full_rows, ROW_TILE):
        x0, x1 = a[rows[i], first_col:stop_col], a[rows[i + 1], first_col:stop_col]
        x2, x3 = a[rows[i + 2], first_col:stop_col], a[rows[i + 3], first_col:stop_col]
        for m in range(0, full_outs, 2):
            w, v = weight[m, first_col:stop_col], weight[m + 1, first_col:stop_col]
            s0 = s1 = s2 = s3 = t0 = t1 = t2 = t3 = zero
            for k in range(width):
                s0 += x0[k] * w[k]
                s1 += x1[k] * w[k]
                s2 += x2[k] * w[k]
                s3 += x3[k] * w[k]
                t0 += x0[k] * v[k]
                t1 += x1[k] * v[k]
                t2 += x2[k] * v[k]
                t3 += x3[k] * v[k]
            out[i, m], out[i + 1, m], out[i + 2, m], out[i + 3, m] = s0, s1, s2, s3
            out[i, m + 1], out[i + 1, m + 1], out[i + 2, m + 1], out[i + 3, m + 1] = t0, t1, t2, t3
        for m in range(full_outs, n_out):
            w = weight[m, first_col:stop_col]
            out[i, m], out[i + 1, m], out[i + 2, m], out[i + 3, m] = (
                _dot(x0, w), _dot(x1, w), _dot(x2, w), _dot(x3, w))
    for i in range(full_rows, n):
        for m in range(n_out):
            out[i, m] = _dot(a[rows[i], first_col:stop_col], weight[m, first_col:stop_col])
    for i in range(n):
        for m in range(n_out):
            v = out[i, m] + bias[m] if bias.size else out[i, m]
            out[i, m] = zero if relu and v <= zero else v  # NaN stays NaN, as torch.relu


@njit(cache=True, fastmath=FAST)
def _dot(x, w):
    """sum_k x[k] w[k], summed in the dtype of x."""
    total = x.dtype.type(0)
    for k in range(x.size):
        total += x[k] * w[k]
    return total


# ---------------------------------------------------------------------------------------------
# loss: mean softmax cross-entropy and its gradient
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def cross_entropy_rows(logits, y, rows, scale, dlogits):
    """Cross-entropy of logits[i] against class y[rows[i]], summed over i < n = rows.size.

    loss_i = lse_i - logits[i, t_i],  lse_i = max_i + log sum_c exp(logits[i, c] - max_i)
    dlogits[i, c] = (softmax(logits[i])[c] - [c == t_i]) * scale    (scale = 1 / batch rows)
    Returns sum_i loss_i in float64 (times `scale` it is this rows' part of the mean loss). The
    sums are float64, as in npcpu.kernels.softmax (no fastmath: NaN must reach the loss).
    """
    classes = logits.shape[1]
    total = 0.0
    for i in range(rows.size):
        x = logits[i]
        target = y[rows[i]]
        row_max = x[0]
        for c in range(1, classes):
            if x[c] > row_max:
                row_max = x[c]
        sum_exp = 0.0
        for c in range(classes):
            e = np.exp(x[c] - row_max)
            dlogits[i, c] = e
            sum_exp += e
        total += row_max + np.log(sum_exp) - x[target]
        inv_sum_exp = 1.0 / sum_exp
        for c in range(classes):
            dlogits[i, c] = dlogits[i, c] * inv_sum_exp * scale
        dlogits[i, target] -= scale
    return total


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def relu_backward(dz, out, n):
    """dz[i, m] = 0 where out[i, m] <= 0 (out = max(z, 0) is positive exactly where z is), i < n."""
    zero = dz.dtype.type(0)
    for i in range(n):
        for m in range(dz.shape[1]):
            if not out[i, m] > zero:
                dz[i, m] = zero


@njit(cache=True, fastmath=FAST)
def add_weight_grad(dz, a, rows, grad_weight, first_col, stop_col):
    """grad_weight[m, k] += sum_i dz[i, m] a[rows[i], k] over the n = rows.size rows, for the
    columns first_col <= k < stop_col.

    In the forward pass this was `out[i, m] += a[rows[i], k] * weight[m, k]`, so each row adds
    dz[i, m] * a[rows[i], :] to weight row m. Tiles of 4 rows x 2 weight rows: each pass over a
    pair of gradient rows adds 4 rows of a (6 loads and 2 stores per 8 multiply-adds).
    """
    n = rows.size
    n_out, width = grad_weight.shape[0], stop_col - first_col
    full_rows, full_outs = n - n % ROW_TILE, n_out - n_out % 2
    for i in range(0, full_rows, ROW_TILE):
        x0, x1 = a[rows[i], first_col:stop_col], a[rows[i + 1], first_col:stop_col]
        x2, x3 = a[rows[i + 2], first_col:stop_col], a[rows[i + 3], first_col:stop_col]
        for m in range(0, full_outs, 2):
            d0, d1, d2, d3 = dz[i, m], dz[i + 1, m], dz[i + 2, m], dz[i + 3, m]
            e0, e1, e2, e3 = dz[i, m + 1], dz[i + 1, m + 1], dz[i + 2, m + 1], dz[i + 3, m + 1]
            g, h = grad_weight[m, first_col:stop_col], grad_weight[m + 1, first_col:stop_col]
            for k in range(width):
                g[k] += d0 * x0[k] + d1 * x1[k] + d2 * x2[k] + d3 * x3[k]
                h[k] += e0 * x0[k] + e1 * x1[k] + e2 * x2[k] + e3 * x3[k]
        for m in range(full_outs, n_out):
            d0, d1, d2, d3 = dz[i, m], dz[i + 1, m], dz[i + 2, m], dz[i + 3, m]
            g = grad_weight[m, first_col:stop_col]
            for k in range(width):
                g[k] += d0 * x0[k] + d1 * x1[k] + d2 * x2[k] + d3 * x3[k]
    for i in range(full_rows, n):
        x0 = a[rows[i], first_col:stop_col]
        for m in range(n_out):
            d0 = dz[i, m]
            g = grad_weight[m, first_col:stop_col]
            for k in range(width):
                g[k] += d0 * x0[k]


@njit(cache=True)
def add_bias_grad(dz, n, grad_bias):
    """grad_bias[m] += sum_{i < n} dz[i, m]."""
    for i in range(n):
        grad_bias += dz[i]


@njit(cache=True, fastmath=FAST)
def input_grad(dz, weight, n, dx):
    """dx[i, k] = sum_m dz[i, m] weight[m, k] for i < n (overwritten): dL/da = dz W."""
    n_out, n_in = weight.shape
    for i in range(n):
        d = dz[i]
        row = dx[i]
        row[...] = 0
        for m in range(n_out):
            w = weight[m]
            for k in range(n_in):
                row[k] += d[m] * w[k]


# ---------------------------------------------------------------------------------------------
# the optimizer: torch.optim.SGD
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def sgd_update(param, grad, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov,
               maximize, first_step):
    """One torch.optim.SGD step on flat param (P,) from grad (P,); momentum_buffer (P,) or (0,).

    g = -grad if maximize else grad;  g += weight_decay * w
    b = g on the first step, else momentum * b + (1 - dampening) * g       (momentum != 0)
    g = g + momentum * b if nesterov else b                                 (momentum != 0)
    w = w - lr * g
    """
    real = param.dtype.type
    lr, momentum, weight_decay = real(lr), real(momentum), real(weight_decay)
    one_minus_dampening = real(1.0 - dampening)
    for j in range(param.size):
        g = -grad[j] if maximize else grad[j]
        if weight_decay != 0:
            g += weight_decay * param[j]
        if momentum != 0:
            if first_step:
                b = g
            else:
                b = momentum * momentum_buffer[j] + one_minus_dampening * g
            momentum_buffer[j] = b
            g = g + momentum * b if nesterov else b
        param[j] -= lr * g


# ---------------------------------------------------------------------------------------------
# a step: layer 0 split by columns over the threads, the layers above it on every thread
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def column_block(n_in, block):
    """The columns [first, stop) of block `block` of COLUMN_BLOCKS: near-equal, cache-line aligned."""
    align = CACHE_LINE // 4

    def edge(b):
        return n_in if b == COLUMN_BLOCKS else min(n_in, (n_in * b // COLUMN_BLOCKS + align - 1)
                                                   // align * align)
    return edge(block), edge(block + 1)


@njit(cache=True)
def layer0_partial_sums(x, rows, weight, thread, threads, partials):
    """partials[c, i, m] = sum_k x[rows[i], k] weight[m, k] over the columns of block c, for
    this thread's blocks c = thread, thread + T, ...; tile by tile of rows, all of the thread's
    blocks of a tile while its rows are in cache, and the next tile's rows prefetched meanwhile."""
    empty = np.empty(0, weight.dtype)
    for i in range(0, rows.size, BATCH_TILE):
        tile = rows[i:i + BATCH_TILE]
        for block in range(thread, COLUMN_BLOCKS, threads):
            first, stop = column_block(x.shape[1], block)
            prefetch_rows(x[:, first:stop], rows, i + BATCH_TILE, i + 2 * BATCH_TILE)
            linear_forward(x, tile, weight, empty, False, partials[block, i:i + BATCH_TILE],
                           first, stop)


@njit(cache=True)
def layer0_output(partials, bias, relu, first, stop, out):
    """out[i] = relu?(partials[0, i] + ... + partials[C - 1, i] + bias) for first <= i < stop: the
    block sums added in block order, so the result does not depend on which thread summed which
    block."""
    zero = out.dtype.type(0)
    for i in range(first, stop):
        for m in range(out.shape[1]):
            v = partials[0, i, m]
            for block in range(1, COLUMN_BLOCKS):
                v += partials[block, i, m]
            if bias.size:
                v += bias[m]
            out[i, m] = zero if relu and v <= zero else v  # NaN stays NaN, as torch.relu


@njit(cache=True, fastmath=FAST)
def sum_of_squares(a):
    """sum_i a_i^2 of a 1-D or 2-D array, summed in float64."""
    total = 0.0
    for row in a.reshape(-1, a.shape[-1]):
        for v in row:
            total += float(v) * float(v)
    return total


@njit(cache=True)
def head_rows(partials, rows, y, first, stop, scale, weights, biases, relu, acts, dzs,
              group_weight_grads, group_bias_grads, base):
    """Everything of a step after layer 0's GEMM for the batch rows first .. stop - 1 (a row
    group; their samples are rows[first:stop]): layer 0's bias and ReLU, the layers above forward,
    the loss, their backward down to dz_0. The group's gradients of every parameter but W_0 go to
    group_weight_grads[base + l], group_bias_grads[base + l] (overwritten); dz_0 to dzs[0].
    Returns the group's summed loss (times `scale` = 1 / batch rows it is its part of the mean)."""
    n_layers = len(weights)
    count = stop - first
    local = np.arange(first, stop)
    layer0_output(partials, biases[0], relu[0], first, stop, acts[0])
    for l in range(1, n_layers):
        linear_forward(acts[l - 1], local, weights[l], biases[l], relu[l], acts[l][first:stop], 0,
                       weights[l].shape[1])
    loss = cross_entropy_rows(acts[n_layers - 1][first:stop], y, rows[first:stop], scale,
                              dzs[n_layers - 1][first:stop])
    for l in range(n_layers - 1, -1, -1):
        dz = dzs[l][first:stop]
        if relu[l]:
            relu_backward(dz, acts[l][first:stop], count)
        if biases[l].size:
            group_bias_grads[base + l][:] = 0
            add_bias_grad(dz, count, group_bias_grads[base + l])
        if l > 0:
            group_weight_grads[base + l][:] = 0
            add_weight_grad(dz, acts[l - 1], local, group_weight_grads[base + l], 0,
                            weights[l].shape[1])
            input_grad(dz, weights[l], count, dzs[l - 1][first:stop])  # W_l before its update
    return loss


@njit(cache=True)
def head_update(weights, biases, group_weight_grads, group_bias_grads, grad_weights, grad_biases,
                lrs, momentum_buffers, hyper, flags, first_step):
    """SGD on this thread's copies of every parameter but W_0, with the gradient summed over the
    row groups in group order (so every thread, and any thread count, gets the same sum). Returns
    the sum of squared gradients of these parameters."""
    n_layers = len(weights)
    groups = len(group_bias_grads) // n_layers
    squares = 0.0
    for l in range(n_layers):
        if biases[l].size:
            total = grad_biases[l]
            total[:] = group_bias_grads[l]
            for g in range(1, groups):
                total += group_bias_grads[g * n_layers + l]
            squares += sum_of_squares(total)
            p = 2 * l + 1
            sgd_update(biases[l], total, momentum_buffers[p], lrs[p], hyper[p, 1], hyper[p, 2],
                       hyper[p, 3], flags[p, 0], flags[p, 1], first_step)
        if l > 0:
            total = grad_weights[l]
            total[:] = group_weight_grads[l]
            for g in range(1, groups):
                total += group_weight_grads[g * n_layers + l]
            squares += sum_of_squares(total)
            p = 2 * l
            sgd_update(weights[l].reshape(-1), total.reshape(-1), momentum_buffers[p], lrs[p],
                       hyper[p, 1], hyper[p, 2], hyper[p, 3], flags[p, 0], flags[p, 1], first_step)
    return squares


@njit(cache=True)
def layer0_weight_update(x, rows, next_rows, dz, weight, grad_weight, momentum_buffer, thread,
                         threads, lr, hyper, flags, first_step, block_squares):
    """g_W0 = dz_0^T x[rows] for the columns of this thread's blocks (tile by tile of rows, as in
    layer0_partial_sums), then SGD on those columns of W_0; block_squares[c] = the sum of
    squared gradients of block c.

    x[rows] is in this core's cache by now, so the memory bus would be idle: each tile prefetches
    the thread's columns of the matching tile of the next batch, x[next_rows] (next_rows may be
    empty), and the next step's forward finds them in cache."""
    n_out, n_in = weight.shape
    for block in range(thread, COLUMN_BLOCKS, threads):
        first, stop = column_block(n_in, block)
        grad_weight[:, first:stop] = 0
    per_tile = -(-next_rows.size * BATCH_TILE // max(rows.size, 1))
    for t, i in enumerate(range(0, rows.size, BATCH_TILE)):
        for block in range(thread, COLUMN_BLOCKS, threads):
            first, stop = column_block(n_in, block)
            prefetch_rows(x[:, first:stop], next_rows, t * per_tile, (t + 1) * per_tile)
            add_weight_grad(dz[i:i + BATCH_TILE], x, rows[i:i + BATCH_TILE], grad_weight, first,
                            stop)
    for block in range(thread, COLUMN_BLOCKS, threads):
        first, stop = column_block(n_in, block)
        block_squares[block] = 0.0
        for m in range(n_out):
            block_squares[block] += sum_of_squares(grad_weight[m, first:stop])
            buffer = momentum_buffer[m * n_in + first:m * n_in + stop] if momentum_buffer.size \
                else momentum_buffer
            sgd_update(weight[m, first:stop], grad_weight[m, first:stop], buffer, lr, hyper[1],
                       hyper[2], hyper[3], flags[0], flags[1], first_step)


@njit(cache=True, nogil=True)
def train_worker(thread, threads, counter, x, y, order, batch_size, first_batch, n_steps, weights,
                 biases, relu, momentum_buffers, lrs, hyper, flags, first_step, partials, acts,
                 dzs, group_weight_grads, group_bias_grads, group_losses, grad_weights,
                 grad_biases, block_squares, losses, grad_norms):
    """Thread `thread` of `threads` runs `n_steps` SGD steps from batch `first_batch` of `order`.

    Batch b is order[b * batch_size : (b + 1) * batch_size] (the last one may be shorter). A
    thread's share of a step is blocks c = thread, thread + T, ... (of layer 0's columns) and row
    groups g = thread, thread + T, ... (of the batch's rows, C of them too):
      (1) layer 0's partial sums over its column blocks, into partials[s % 2, c]; all meet;
      (2) head_rows for its row groups: the rest of the forward, the loss, the backward to dz_0,
          the groups' gradients of everything but W_0; all meet;
      (3) head_update: each thread sums the groups' gradients and updates its own copy of
          everything but W_0 (the copies stay bitwise equal); then g_W0 for its column blocks
          from all rows of dz_0, and the update of those columns of W_0, which only it reads.
    The partial sums and the squared gradients (for the norm) alternate between two buffers, so
    that a thread may start (1) of step s + 1 while another is still in (3) of step s; the first
    meeting of step s + 1 waits for everybody to finish step s.

    Shared by all threads: x, y, order, weights[0] and momentum_buffers[0] (each thread writes
    only its columns), partials (2, C, B, M0), acts[l] and dzs[l] (B, M) (each thread writes its
    row groups), group_weight_grads[g * L + l], group_bias_grads[g * L + l], group_losses (C,),
    block_squares (2, C), counter (1,) int64 zero, losses, grad_norms. This thread's own:
    weights[1:], biases, momentum_buffers[1:] (thread 0's are the model's), grad_weights (of
    g_W0 it fills only its columns), grad_biases.
    Parameter p (weight of layer l is p = 2 l, its bias p = 2 l + 1) uses lrs[s, p] and
    hyper[p] = (lr, momentum, dampening, weight_decay), flags[p] = (nesterov, maximize);
    momentum_buffers[p] is flat, (0,) when momentum is 0. `first_step`: SGD has taken no step.
    Thread 0 writes losses[s] and grad_norms[s]. Stops before updating anything in the first
    step whose loss is not finite; returns the number of steps taken.
    """
    n_layers = len(weights)
    head_squares = 0.0
    for s in range(n_steps):
        start = (first_batch + s) * batch_size
        rows = order[start:min(start + batch_size, order.size)]
        next_rows = order[start + batch_size:min(start + 2 * batch_size, order.size)] \
            if s + 1 < n_steps else order[:0]
        n = rows.size
        layer0_partial_sums(x, rows, weights[0], thread, threads, partials[s % 2])
        barrier_wait(counter, threads, 2 * s)  # every thread has also finished step s - 1
        if thread == 0 and s > 0:
            grad_norms[s - 1] = np.sqrt(head_squares + block_squares[(s - 1) % 2].sum())
        for g in range(thread, COLUMN_BLOCKS, threads):
            group_losses[g] = head_rows(partials[s % 2], rows, y, n * g // COLUMN_BLOCKS,
                                        n * (g + 1) // COLUMN_BLOCKS, 1.0 / n, weights, biases,
                                        relu, acts, dzs, group_weight_grads, group_bias_grads,
                                        g * n_layers)
        barrier_wait(counter, threads, 2 * s + 1)  # dz_0 and the groups' gradients are complete
        loss = group_losses.sum() / n
        if thread == 0:
            losses[s] = loss
        if not np.isfinite(loss):
            return s
        head_squares = head_update(weights, biases, group_weight_grads, group_bias_grads,
                                   grad_weights, grad_biases, lrs[s], momentum_buffers, hyper,
                                   flags, first_step and s == 0)
        layer0_weight_update(x, rows, next_rows, dzs[0], weights[0], grad_weights[0],
                             momentum_buffers[0], thread, threads, lrs[s, 0], hyper[0], flags[0],
                             first_step and s == 0, block_squares[s % 2])
    barrier_wait(counter, threads, 2 * n_steps)
    if thread == 0:
        grad_norms[n_steps - 1] = np.sqrt(head_squares + block_squares[(n_steps - 1) % 2].sum())
    return n_steps
