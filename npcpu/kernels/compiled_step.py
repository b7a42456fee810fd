"""A whole training epoch of a small MLP classifier inside one Numba call (npcpu.train.compiled).

Legend: S samples in the data set, D input features, B batch size (n <= B rows in the last batch),
L layers; layer l maps K = width[l] to M = width[l + 1] features.
    x (S, D), y (S,) int64 class labels, order (S,) int64: the epoch's sample order
    weight[l] (M, K) torch layout, bias[l] (M,) or (0,) when the layer has no bias
    act[l] (B, width[l]) the input of layer l (act[0] is never filled: layer 0 reads x[order] rows
    directly), out[l] (B, M) its output after the optional ReLU, dz (B, M) dL/d(pre-activation)

One step is the reference loop of npcpu (model.forward, CrossEntropyLoss, model.backward,
SGD.step, zero_grad) in one pass over the layers each way:

    a_{l+1} = relu?(a_l W_l^T + b_l)                      forward, a_0 = x[batch rows]
    dz_L    = (softmax(a_L) - onehot(y)) / n              mean cross-entropy over the n rows
    dz_l    = dL/da_{l+1} * (a_{l+1} > 0)                 only after a ReLU (a > 0 exactly where z > 0)
    g_W     = dz_l^T a_l,   g_b = sum_rows dz_l           the gradients of this step only
    dL/da_l = dz_l W_l                                    with W_l before its update; not for l = 0
    W_l, b_l <- SGD(W_l, g_W), SGD(b_l, g_b)              torch.optim.SGD's rule, see `sgd_update`

The GEMMs are register-tiled loops over 4 rows at a time whose innermost loop runs over the
contiguous K dimension, so LLVM vectorizes it: for the layers this path is for (784 -> 10 at batch
128 is 1M multiply-adds) they are faster than a BLAS call, which pays its dispatch and packing for
every one of the 3 GEMMs of a layer and step. Everything runs on one thread: a step of such a model
takes tens of microseconds, and waking a second thread for each GEMM costs about as much (and
much more when the other core is busy); see bench/bench_logreg.py.

`reassoc` lets LLVM keep several partial sums in a dot product (the order of a float32 sum then
differs from BLAS's, within float32 rounding); `contract` fuses multiply-adds. Neither removes NaN
or Inf: a diverged loss stays NaN.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

FAST = {"contract", "reassoc"}
ROW_TILE = 4  # rows that share each load of a weight row in the GEMMs below
CACHE_LINE = 64  # bytes


@intrinsic
def prefetch(typingctx, array, index):
    """Ask the CPU to start loading the cache line of array[index] (1-D) into every cache level.

    LLVM's llvm.prefetch (read, high locality, data cache); a hint that never faults. It lets the
    rows of the next tile of a shuffled batch arrive while the current tile is being computed
    (the hardware prefetcher only follows the rows once they are being read).
    """
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, data, [args[1]],
                                           wraparound=False)
        byte_pointer, int32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32]),
            "llvm.prefetch.p0i8")
        builder.call(function, [builder.bitcast(pointer, byte_pointer), int32(0), int32(3), int32(1)])
        return context.get_dummy_value()
    return types.void(array, index), codegen


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
def linear_forward(a, rows, weight, bias, relu, out):
    """out[i, m] = sum_k a[rows[i], k] weight[m, k] + bias[m], then max(., 0) when `relu`.

    a (R, K) with rows (n,) indices into it; weight (M, K); bias (M,) or (0,) for none;
    out (>= n, M), rows 0..n-1 written. Tiles of 4 rows x 2 weight rows: 6 loads per 8
    multiply-adds, 8 running sums (vectors, after LLVM vectorizes over k).
    """
    n = rows.size
    n_out, n_in = weight.shape
    zero = out.dtype.type(0)
    full_rows, full_outs = n - n % ROW_TILE, n_out - n_out % 2
    prefetch_rows(a, rows, 0, ROW_TILE)
    for i in range(0, full_rows, ROW_TILE):
        prefetch_rows(a, rows, i + ROW_TILE, i + 2 * ROW_TILE)
        x0, x1, x2, x3 = a[rows[i]], a[rows[i + 1]], a[rows[i + 2]], a[rows[i + 3]]
        for m in range(0, full_outs, 2):
            w, v = weight[m], weight[m + 1]
            s0 = s1 = s2 = s3 = t0 = t1 = t2 = t3 = zero
            for k in range(n_in):
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
            out[i, m], out[i + 1, m], out[i + 2, m], out[i + 3, m] = (
                _dot(x0, weight[m]), _dot(x1, weight[m]), _dot(x2, weight[m]), _dot(x3, weight[m]))
    for i in range(full_rows, n):
        for m in range(n_out):
            out[i, m] = _dot(a[rows[i]], weight[m])
    for i in range(n):
        for m in range(n_out):
            v = out[i, m] + bias[m] if bias.size else out[i, m]
            out[i, m] = max(v, zero) if relu else v


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
def cross_entropy_mean(logits, targets, n, dlogits):
    """Mean cross-entropy of logits[:n] (>= n, C) against targets (n,); dlogits[:n] = its gradient.

    loss = sum_i (lse_i - logits[i, t_i]) / n,  lse_i = max_i + log sum_c exp(logits[i, c] - max_i)
    dlogits[i, c] = (softmax(logits[i])[c] - [c == t_i]) / n
    The row sums are float64, as in npcpu.kernels.softmax (no fastmath: NaN must reach the loss).
    """
    classes = logits.shape[1]
    scale = 1.0 / n
    total = 0.0
    for i in range(n):
        x = logits[i]
        row_max = x[0]
        for c in range(1, classes):
            if x[c] > row_max:
                row_max = x[c]
        sum_exp = 0.0
        for c in range(classes):
            e = np.exp(x[c] - row_max)
            dlogits[i, c] = e
            sum_exp += e
        total += row_max + np.log(sum_exp) - x[targets[i]]
        inv_sum_exp = 1.0 / sum_exp
        for c in range(classes):
            dlogits[i, c] = dlogits[i, c] * inv_sum_exp * scale
        dlogits[i, targets[i]] -= scale
    return total * scale


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
def weight_grad(dz, a, rows, grad_weight):
    """grad_weight[m, k] = sum_i dz[i, m] a[rows[i], k] over the n = rows.size rows (overwritten).

    In the forward pass this was `out[i, m] += a[rows[i], k] * weight[m, k]`, so each row adds
    dz[i, m] * a[rows[i], :] to weight row m; four rows are added per pass over grad_weight[m].
    """
    n = rows.size
    n_out, n_in = grad_weight.shape
    grad_weight[...] = 0
    for i in range(0, n - n % ROW_TILE, ROW_TILE):
        x0, x1, x2, x3 = a[rows[i]], a[rows[i + 1]], a[rows[i + 2]], a[rows[i + 3]]
        for m in range(n_out):
            d0, d1, d2, d3 = dz[i, m], dz[i + 1, m], dz[i + 2, m], dz[i + 3, m]
            g = grad_weight[m]
            for k in range(n_in):
                g[k] += d0 * x0[k] + d1 * x1[k] + d2 * x2[k] + d3 * x3[k]
    for i in range(n - n % ROW_TILE, n):
        x0 = a[rows[i]]
        for m in range(n_out):
            d0 = dz[i, m]
            g = grad_weight[m]
            for k in range(n_in):
                g[k] += d0 * x0[k]


@njit(cache=True)
def bias_grad(dz, n, grad_bias):
    """grad_bias[m] = sum_{i < n} dz[i, m] (overwritten)."""
    grad_bias[...] = 0
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
# the epoch
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def train_steps(x, y, order, batch_size, first_batch, n_steps, weights, biases, relu,
                momentum_buffers, hyper, flags, first_step, losses):
    """Run `n_steps` SGD steps from batch `first_batch` of `order`; losses[s] = step s's mean loss.

    Batch b is order[b * batch_size : (b + 1) * batch_size] (the last one may be shorter).
    weights/biases/momentum_buffers are tuples over the layers, updated in place; parameter p
    (weight of layer l is p = 2 l, its bias p = 2 l + 1) uses hyper[p] = (lr, momentum, dampening,
    weight_decay) and flags[p] = (nesterov, maximize); the momentum buffers of layer l are
    momentum_buffers[2 l] and [2 l + 1] ((0,) when momentum is 0 or there is no bias).
    `first_step` is true when the optimizer has taken no step yet (SGD's buffer starts as g).
    """
    n_layers = len(weights)
    dtype = weights[0].dtype
    outs = []
    dzs = []
    for l in range(n_layers):
        outs.append(np.empty((batch_size, weights[l].shape[0]), dtype))
        dzs.append(np.empty((batch_size, weights[l].shape[0]), dtype))
    grad_weights = [np.empty_like(w) for w in weights]
    grad_biases = [np.empty_like(b) for b in biases]
    all_rows = np.arange(batch_size)
    for s in range(n_steps):
        start = (first_batch + s) * batch_size
        rows = order[start:min(start + batch_size, order.size)]
        n = rows.size
        inner_rows = all_rows[:n]
        linear_forward(x, rows, weights[0], biases[0], relu[0], outs[0])
        for l in range(1, n_layers):
            linear_forward(outs[l - 1], inner_rows, weights[l], biases[l], relu[l], outs[l])
        losses[s] = cross_entropy_mean(outs[n_layers - 1], y[rows], n, dzs[n_layers - 1])
        for l in range(n_layers - 1, -1, -1):
            if relu[l]:
                relu_backward(dzs[l], outs[l], n)
            if l > 0:
                weight_grad(dzs[l], outs[l - 1], inner_rows, grad_weights[l])
                input_grad(dzs[l], weights[l], n, dzs[l - 1])  # before W_l changes
            else:
                weight_grad(dzs[l], x, rows, grad_weights[l])
            p = 2 * l
            sgd_update(weights[l].reshape(-1), grad_weights[l].reshape(-1),
                       momentum_buffers[p], hyper[p, 0], hyper[p, 1], hyper[p, 2], hyper[p, 3],
                       flags[p, 0], flags[p, 1], first_step and s == 0)
            if biases[l].size:
                bias_grad(dzs[l], n, grad_biases[l])
                sgd_update(biases[l], grad_biases[l], momentum_buffers[p + 1], hyper[p + 1, 0],
                           hyper[p + 1, 1], hyper[p + 1, 2], hyper[p + 1, 3], flags[p + 1, 0],
                           flags[p + 1, 1], first_step and s == 0)
