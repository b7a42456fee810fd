"""Training steps of a small MLP classifier inside one Numba call per thread (npcpu.train.compiled).

Legend: S samples in the data set, D input features, B batch size (n <= B rows in a batch),
L layers; layer l maps K = width[l] to M = width[l + 1] features; P = 2 L parameters (weight of
layer l is p = 2 l, its bias p = 2 l + 1); C = COLUMN_BLOCKS, T threads (T divides C).
    x (S, D), y (S,) int64 class labels, order (S,) int64: the epoch's sample order
    weight[l] (M, K) torch layout, bias[l] (M,) or (0,) when the layer has no bias
    act[l] (B, M) the output of layer l after its activation (layer 0 reads x[rows] directly)
    dz[l] (B, M) dL/d(pre-activation of layer l)

One step is the reference loop of npcpu (model.forward, CrossEntropyLoss, model.backward,
optimizer.step, zero_grad):

    a_{l+1} = f_l(a_l W_l^T + b_l)                        forward, a_0 = x[batch rows]; f_l the
                                                          identity, ReLU, GELU or tanh
    dz_L    = (softmax(a_L) - onehot(y)) / n              mean cross-entropy over the n rows
    dz_l    = dL/da_{l+1} * f_l'                          ReLU: (a > 0); tanh: 1 - a^2; GELU: from z
    g_W     = dz_l^T a_l,   g_b = sum_rows dz_l           the gradients of this step only
    dL/da_l = dz_l W_l                                    not needed for l = 0
    W_l, b_l <- opt(W_l, g_W), opt(b_l, g_b)              SGD, Adam or AdamW: compiled_update

The models this path is for spend nearly all their work in layer 0 (softmax regression 784 -> 10 is
all layer 0), whose input is wide and whose output is narrow. Its two GEMMs split cleanly by input
column k: z_0 = sum over column blocks of x[:, block] W_0[:, block]^T, and g_W0[:, block] = dz_0^T
x[:, block] needs only the block's columns. So thread t owns a contiguous run of C / T column blocks
of W_0 for good (thread_blocks): it sums its blocks' part of z_0 for the batch, and the threads meet
(a spin barrier, npcpu.kernels.intrinsics). The rest of the step is row by row up to the gradient
sums: the batch's rows are cut into C row groups, thread t takes groups t, t + T, ..., adds the C
partial sums of its rows in block order and runs the bias, activation, the layers above, the loss
and their backward down to dz_0 for them, writing each group's gradients apart. The threads meet again;
each sums the groups' gradients in group order and updates its own copy of everything but W_0 (the
copies stay bitwise equal: same numbers, same order), then computes g_W0 from all rows of dz_0 and
updates W_0 for its own column blocks only. What crosses between cores per step is the B x M partial
sums, dz_0 and the small gradients above layer 0, never W_0 or its gradient; the batch's rows are
read from memory once and read again from the core's cache for g_W0. Every sum runs in the same
order for any T, so the results do not depend on the thread count. The threads are plain Python
threads running `train_worker` without the GIL: launching one of Numba's parallel regions costs more
than a spin barrier, and a step of such a model is short. (Running the rest of the step on every
thread for all rows, as a first version did, spent a large part of each epoch on work the other
thread repeated.)

The per-layer loops (forward, dL/dW, dL/dx) are in npcpu.kernels.compiled_gemm. What the reference
path computes too is the reference path's own code or formulas: the loss is the reference loss's
small-batch kernel (cross_entropy_rows), the bias gradient is
npcpu.kernels.linear.add_row_sums, the activations the scalar functions of
npcpu.kernels.activations, and the optimizer update of an element the scalar rules of
npcpu.kernels.optim (npcpu.kernels.compiled_update), so that the two paths cannot drift apart.
"""

from collections import namedtuple

import numpy as np
from numba import njit

from npcpu.kernels.compiled_gemm import (CACHE_LINE, FAST, RELU, activation_backward,
                                         activation_forward, add_weight_grad, input_grad,
                                         linear_forward, prefetch_rows)
from npcpu.kernels.compiled_update import update_parameter
from npcpu.kernels.convert import bf16_bits_to_f32, round_bf16_nearest_bits
from npcpu.kernels.intrinsics import barrier_wait
from npcpu.kernels.linear import add_row_sums
from npcpu.kernels.softmax import cross_entropy_forward_backward_serial

BATCH_TILE = 16  # rows per tile of layer 0's GEMMs; the next tile's rows are prefetched
COLUMN_BLOCKS = 2  # layer 0's columns in blocks, summed in block order; threads divide it.
# Each block more costs every tile of layer 0's GEMMs its loop starts and horizontal sums again: at
# this size a step is too short for more than two threads to pay for their meetings anyway.
NO_IGNORED_CLASS = -1  # targets are checked to be classes >= 0, so no row is ignored
LATE_LIMIT = (2.0, 0.02)  # late meetings allowed: a few (the second thread starts later), then 2%

StepPlan = namedtuple("StepPlan", ["x", "x_scale", "y", "order", "batch_size", "first_batch",
                                   "steps", "lrs", "corrections", "steps_taken", "late_limit"])
"""What `train_worker` runs: `steps` steps from batch `first_batch` of `order` (S,) int64, batch b
being order[b * batch_size : (b + 1) * batch_size] (the last one may be shorter), over features x
(S, D) * x_scale and labels y (S,) int64; lrs (steps, P) float64 the learning rate of each step and
parameter, corrections (steps, P, 2) float64 Adam's bias corrections at each step (see
npcpu.kernels.compiled_update; unused by SGD); `steps_taken`: the optimizer's steps before the
first (the same for every parameter). x is in the compute dtype with x_scale 1 (multiplying by 1 is exact), or uint8 pixels with x_scale in that
dtype (1 / 255 for MNIST): the GEMMs then read a quarter of the bytes, and the scale is applied to
their sums (layer0_output, layer0_weight_update). late_limit (2,) float64 (allowed, share): thread 0
goes on alone once more than allowed + share * m of the first m meetings were late (see
train_worker; LATE_LIMIT by default)."""
ThreadModel = namedtuple("ThreadModel", ["weights", "biases", "activations", "adam",
                                         "first_moments", "second_moments", "hyper", "flags",
                                         "storage", "masters", "tensor_index", "seed",
                                         "bf16_inputs", "grad_weights", "grad_biases"])
"""One thread's parameters and optimizer: weights[l] (M, K), biases[l] (M,) or (0,), activations
(L,) int64 (npcpu.kernels.compiled_gemm's codes: IDENTITY, RELU, GELU, GELU_TANH, TANH); the
optimizer's state and settings adam, first_moments[p], second_moments[p], hyper (P, 4), flags
(P, 2), storage (P,), masters[p], tensor_index (P,), seed as npcpu.kernels.compiled_update
describes them; bf16_inputs: the GEMMs read bfloat16 inputs, as the reference's native bf16 GEMMs
do (npcpu.nn.weight_blocks): every layer's input act[l - 1] (x itself comes rounded) and, for
backward, GELU's kept input, and dz rounded after the bias gradient took it (round_rows_bf16);
the scratch gradients grad_weights[l], grad_biases[l]. Under bf16 the weights and biases are
float32 arrays holding bf16 values. Shared by all threads: weights[0] and the state of W_0 (each thread writes only
its columns of W_0); the rest are this thread's own (thread 0's are the model's)."""
SharedBuffers = namedtuple("SharedBuffers", ["counter", "partials", "acts", "pre_acts", "dzs",
                                             "group_weight_grads", "group_bias_grads",
                                             "group_losses", "block_squares", "batch_rows",
                                             "targets", "row_losses", "losses", "grad_norms",
                                             "late_meetings", "alone_from"])
"""What the threads share: counter (1,) int64 zero (the barrier), partials (2, C, B, M0),
acts[l], pre_acts[l] (GELU's inputs; (0, 0) for other layers) and dzs[l] (B, M) (each thread
writes its row groups), group_weight_grads[g * L + l],
group_bias_grads[g * L + l], group_losses (C,), block_squares (2, C); batch_rows (B,) int64
0 .. B - 1 (the rows of acts a row group reads), the workspaces targets (B,) int64 and row_losses
(B,) float64 of the loss (each row group uses its rows' part: nothing is allocated per step);
and the outputs losses (steps,) and grad_norms (steps,) that thread 0 writes; late_meetings (T,)
int64: at how many of its meetings thread t waited long enough to yield its core (another thread
was not running: the machine is busy with other work); alone_from (1,) int64: the step from which
thread 0 went on alone (steps when it never did)."""


# ---------------------------------------------------------------------------------------------
# the loss, with the reference loss's formulas
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def cross_entropy_rows(logits, y, rows, scale, dlogits, targets, losses):
    """Cross-entropy of logits[i] against class y[rows[i]], summed over i < n = rows.size, and its
    gradient dlogits[i] = (softmax(logits[i]) - onehot) * scale (scale = 1 / batch rows); logits
    and dlogits (>= n, C) C-contiguous; targets (>= n,) int64 and losses (>= n,) float64 are
    workspaces (overwritten). Returns the sum in float64 (times `scale` it is these rows' part of
    the mean loss).

    The reference loss's own small-batch kernel (npcpu.kernels.softmax.
    cross_entropy_forward_backward_serial, no label smoothing, no ignored rows), on the group's
    targets gathered from y."""
    n = rows.size
    for i in range(n):
        targets[i] = y[rows[i]]
    cross_entropy_forward_backward_serial(losses[:n], dlogits[:n], logits[:n], targets[:n],
                                          NO_IGNORED_CLASS, 0.0, scale, logits.shape[1])
    total = 0.0
    for i in range(n):
        total += losses[i]
    return total


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
def thread_blocks(thread, threads):
    """The column blocks [first, stop) of thread `thread` of `threads`: a contiguous run, so that
    the thread's part of g_W0 is one run of columns (long loops, one call per tile)."""
    per_thread = COLUMN_BLOCKS // threads
    return thread * per_thread, (thread + 1) * per_thread


@njit(cache=True)
def layer0_partial_sums(x, rows, weight, thread, threads, partials):
    """partials[c, i, m] = sum_k x[rows[i], k] weight[m, k] over the columns of block c, for
    this thread's blocks c (thread_blocks); tile by tile of rows, all of the thread's blocks of a
    tile while its rows are in cache, and the next tile's rows prefetched meanwhile."""
    empty = np.empty(0, weight.dtype)
    first_block, stop_block = thread_blocks(thread, threads)
    for i in range(0, rows.size, BATCH_TILE):
        tile = rows[i:i + BATCH_TILE]
        for block in range(first_block, stop_block):
            first, stop = column_block(x.shape[1], block)
            prefetch_rows(x[:, first:stop], rows, i + BATCH_TILE, i + 2 * BATCH_TILE)
            linear_forward(x, tile, weight, empty, False, partials[block, i:i + BATCH_TILE],
                           first, stop)


@njit(cache=True)
def layer0_output(partials, x_scale, bias, relu, first, stop, out):
    """out[i] = relu?((partials[0, i] + ... + partials[C - 1, i]) * x_scale + bias) for
    first <= i < stop: the block sums added in block order, so the result does not depend on which
    thread summed which block."""
    zero = out.dtype.type(0)
    for i in range(first, stop):
        for m in range(out.shape[1]):
            v = partials[0, i, m]
            for block in range(1, COLUMN_BLOCKS):
                v += partials[block, i, m]
            v *= x_scale
            if bias.size:
                v += bias[m]
            out[i, m] = zero if relu and v <= zero else v  # NaN stays NaN, as torch.relu


@njit(cache=True, fastmath=FAST)
def sum_of_squares(a):
    """sum_k a_k^2 of a 1-D array, summed in float64 (an index loop: LLVM vectorizes it, where
    iterating over the array's elements it did not)."""
    total = 0.0
    for k in range(a.size):
        v = float(a[k])
        total += v * v
    return total


@njit(cache=True)
def scale_in_place(a, scale):
    """a[k] *= scale over a 1-D array, as an index loop (Numba's `*=` on a strided 2-D slice goes
    through a generic element iterator, many times slower)."""
    for k in range(a.size):
        a[k] *= scale


@njit(cache=True)
def round_rows_bf16(a, first, stop):
    """a[i] rounded to the nearest bfloat16 (ties to even), in place, for first <= i < stop: the
    value a bf16 GEMM input has (npcpu.precision.to_storage)."""
    for i in range(first, stop):
        for m in range(a.shape[1]):
            a[i, m] = bf16_bits_to_f32(round_bf16_nearest_bits(a[i, m]))


@njit(cache=True)
def head_rows(model, shared, partials, x_scale, rows, y, first, stop, scale, base):
    """Everything of a step after layer 0's GEMM for the batch rows first .. stop - 1 (a row
    group; their samples are rows[first:stop]): layer 0's bias and activation, the layers above
    forward, the loss, their backward down to dz_0. The group's gradients of every parameter but W_0
    go to group_weight_grads[base + l], group_bias_grads[base + l] (overwritten); dz_0 to dzs[0].
    Returns the group's summed loss (times `scale` = 1 / batch rows it is its part of the mean)."""
    weights, biases, activations = model.weights, model.biases, model.activations
    acts, pre_acts, dzs = shared.acts, shared.pre_acts, shared.dzs
    n_layers = len(weights)
    count = stop - first
    local = shared.batch_rows[first:stop]
    layer0_output(partials, x_scale, biases[0], activations[0] == RELU, first, stop, acts[0])
    for l in range(n_layers):
        if l > 0:
            linear_forward(acts[l - 1], local, weights[l], biases[l], activations[l] == RELU,
                           acts[l][first:stop], 0, weights[l].shape[1])
        activation_forward(activations[l], acts[l][first:stop], pre_acts[l][first:stop], count)
        if model.bf16_inputs:  # the next layer's input, GELU's and tanh's kept values in bf16
            round_rows_bf16(pre_acts[l], first, stop if pre_acts[l].size else first)
            round_rows_bf16(acts[l], first, stop if l + 1 < n_layers else first)
    loss = cross_entropy_rows(acts[n_layers - 1][first:stop], y, rows[first:stop], scale,
                              dzs[n_layers - 1][first:stop], shared.targets[first:stop],
                              shared.row_losses[first:stop])
    for l in range(n_layers - 1, -1, -1):
        dz = dzs[l][first:stop]
        activation_backward(activations[l], dz, acts[l][first:stop], pre_acts[l][first:stop], count)
        if biases[l].size:
            shared.group_bias_grads[base + l][:] = 0
            add_row_sums(dz, shared.group_bias_grads[base + l])
        if model.bf16_inputs:
            round_rows_bf16(dzs[l], first, stop)
        if l > 0:
            shared.group_weight_grads[base + l][:] = 0
            add_weight_grad(dz, acts[l - 1], local, shared.group_weight_grads[base + l], 0,
                            weights[l].shape[1])
            input_grad(dz, weights[l], count, dzs[l - 1][first:stop])  # W_l before its update
    return loss


@njit(cache=True)
def head_update(model, shared, lrs, corrections, step):
    """The optimizer's step on this thread's copies of every parameter but W_0, with the gradient
    summed over the row groups in group order (so every thread, and any thread count, gets the
    same sum). Returns the sum of squared gradients of these parameters."""
    weights, biases = model.weights, model.biases
    group_weight_grads, group_bias_grads = shared.group_weight_grads, shared.group_bias_grads
    n_layers = len(weights)
    groups = len(group_bias_grads) // n_layers
    squares = 0.0
    for l in range(n_layers):
        if biases[l].size:
            total = model.grad_biases[l]
            total[:] = group_bias_grads[l]
            for g in range(1, groups):
                total += group_bias_grads[g * n_layers + l]
            squares += sum_of_squares(total)
            p = 2 * l + 1
            update_parameter(model, p, biases[l].reshape(1, -1), total.reshape(1, -1), 0,
                             total.size, lrs[p], corrections[p], step)
        if l > 0:
            total = model.grad_weights[l]
            total[:] = group_weight_grads[l]
            for g in range(1, groups):
                total += group_weight_grads[g * n_layers + l]
            squares += sum_of_squares(total.reshape(-1))
            p = 2 * l
            update_parameter(model, p, weights[l], total, 0, total.shape[1], lrs[p],
                             corrections[p], step)
    return squares


@njit(cache=True)
def layer0_weight_update(model, x, x_scale, rows, next_rows, dz, thread, threads, lr, corrections,
                         step, block_squares):
    """g_W0 = (dz_0^T x[rows]) * x_scale for the columns of this thread's blocks (tile by tile of
    rows, as in layer0_partial_sums), then the optimizer's step on those columns of W_0 (lr,
    corrections, step: as update_parameter takes them); block_squares[c] = the sum of
    squared gradients of block c.

    x[rows] is in this core's cache by now, so the memory bus would be idle: each tile prefetches
    the thread's columns of the matching tile of the next batch, x[next_rows] (next_rows may be
    empty), and the next step's forward finds them in cache."""
    weight, grad_weight = model.weights[0], model.grad_weights[0]
    n_out, n_in = weight.shape
    first_block, stop_block = thread_blocks(thread, threads)
    first, stop = column_block(n_in, first_block)[0], column_block(n_in, stop_block - 1)[1]
    grad_weight[:, first:stop] = 0
    per_tile = -(-next_rows.size * BATCH_TILE // max(rows.size, 1))
    for t, i in enumerate(range(0, rows.size, BATCH_TILE)):
        prefetch_rows(x[:, first:stop], next_rows, t * per_tile, (t + 1) * per_tile)
        add_weight_grad(dz[i:i + BATCH_TILE], x, rows[i:i + BATCH_TILE], grad_weight, first, stop)
    for m in range(n_out):
        scale_in_place(grad_weight[m, first:stop], x_scale)
    for block in range(first_block, stop_block):
        block_first, block_stop = column_block(n_in, block)
        block_squares[block] = 0.0
        for m in range(n_out):
            block_squares[block] += sum_of_squares(grad_weight[m, block_first:block_stop])
    update_parameter(model, 0, weight, grad_weight, first, stop, lr, corrections, step)


@njit(cache=True, nogil=True)
def train_worker(thread, threads, plan, model, shared):
    """Thread `thread` of `threads` runs the steps of `plan` (a StepPlan) on `model` (this
    thread's ThreadModel) with the other threads (`shared`, the SharedBuffers).

    A thread's share of a step is its blocks c (thread_blocks: C / T contiguous blocks of layer 0's
    columns) and row groups g = thread, thread + T, ... (of the batch's rows, C of them too):
      (1) layer 0's partial sums over its column blocks, into partials[s % 2, c]; all meet;
      (2) head_rows for its row groups: the rest of the forward, the loss, the backward to dz_0,
          the groups' gradients of everything but W_0; all meet;
      (3) head_update: each thread sums the groups' gradients and updates its own copy of
          everything but W_0 (the copies stay bitwise equal); then g_W0 for its column blocks
          from all rows of dz_0, and the update of those columns of W_0, which only it reads.
    The partial sums and the squared gradients (for the norm) alternate between two buffers, so
    that a thread may start (1) of step s + 1 while another is still in (3) of step s; the first
    meeting of step s + 1 waits for everybody to finish step s.

    On a busy machine a thread often waits for one that is not running, and one thread is faster.
    Each thread posts its count of late meetings before the first meeting of a step; after it,
    all read the same total, and when it is above plan.late_limit's bound the other threads stop
    there (their part of the step's partial sums is done) and thread 0 runs the rest as the only
    thread. Every sum keeps its order, so the results stay the same bit for bit.

    Parameter p (weight of layer l is p = 2 l, its bias p = 2 l + 1) uses plan.lrs[s, p],
    plan.corrections[s, p] and the settings model.hyper[p], model.flags[p]. Thread 0 writes
    shared.losses[s] and shared.grad_norms[s]; each thread its shared.late_meetings. Stops before
    updating anything in the first step whose loss is not finite; returns the number of steps
    taken.
    """
    order, batch_size, n_steps = plan.order, plan.batch_size, plan.steps
    counter, partials, block_squares = shared.counter, shared.partials, shared.block_squares
    n_layers = len(model.weights)
    head_squares, late = 0.0, 0
    allowed, share = plan.late_limit[0], plan.late_limit[1]
    for s in range(n_steps):
        start = (plan.first_batch + s) * batch_size
        rows = order[start:min(start + batch_size, order.size)]
        next_rows = order[start + batch_size:min(start + 2 * batch_size, order.size)] \
            if s + 1 < n_steps else order[:0]
        n = rows.size
        step = plan.steps_taken + s + 1  # the optimizer's count with this step
        layer0_partial_sums(plan.x, rows, model.weights[0], thread, threads, partials[s % 2])
        shared.late_meetings[thread] = late
        late += barrier_wait(counter, threads, 2 * s)  # all have also finished step s - 1
        if threads > 1 and shared.late_meetings.sum() > allowed + share * 2 * s:
            if thread > 0:
                return s
            threads, shared.alone_from[0] = 1, s
        if thread == 0 and s > 0:
            shared.grad_norms[s - 1] = np.sqrt(head_squares + block_squares[(s - 1) % 2].sum())
        for g in range(thread, COLUMN_BLOCKS, threads):
            shared.group_losses[g] = head_rows(model, shared, partials[s % 2], plan.x_scale, rows,
                                               plan.y, n * g // COLUMN_BLOCKS,
                                               n * (g + 1) // COLUMN_BLOCKS, 1.0 / n, g * n_layers)
        late += barrier_wait(counter, threads, 2 * s + 1)  # dz_0, the groups' gradients done
        loss = shared.group_losses.sum() / n
        if thread == 0:
            shared.losses[s] = loss
        if not np.isfinite(loss):
            shared.late_meetings[thread] = late
            return s
        head_squares = head_update(model, shared, plan.lrs[s], plan.corrections[s], step)
        layer0_weight_update(model, plan.x, plan.x_scale, rows, next_rows, shared.dzs[0], thread,
                             threads, plan.lrs[s, 0], plan.corrections[s, 0], step,
                             block_squares[s % 2])
    shared.late_meetings[thread] = late + barrier_wait(counter, threads, 2 * n_steps)
    if thread == 0:
        shared.grad_norms[n_steps - 1] = np.sqrt(head_squares
                                                 + block_squares[(n_steps - 1) % 2].sum())
    return n_steps
