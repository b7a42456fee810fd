"""Float64 central-difference gradient checks for layers and losses.

The scalar checked is L = sum(forward(x) * g) with a random upstream gradient g (never ones: a
backward that returns a constant or zeros would pass a test fed with ones). Run the layer under
precision "fp64" so the analytic gradients are computed in float64 too.
"""

import numpy as np


def numerical_gradient(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """dF/dx by central differences, perturbing `x` in place one element at a time."""
    grad = np.zeros_like(x, dtype=np.float64)
    flat_x, flat_g = x.reshape(-1), grad.reshape(-1)
    for i in range(flat_x.size):
        old = flat_x[i]
        flat_x[i] = old + eps
        f_plus = f()
        flat_x[i] = old - eps
        f_minus = f()
        flat_x[i] = old
        flat_g[i] = (f_plus - f_minus) / (2 * eps)
    return grad


def check_layer_gradients(layer, x: np.ndarray, rng: np.random.Generator, *,
                          check_input: bool = True, rtol: float = 1e-6, atol: float = 1e-8):
    """Compare a layer's backward (dx and every parameter grad) with central differences in float64."""
    layer.set_precision("fp64")
    layer.input_requires_grad = check_input  # opt in to dL/dx (a layer used alone computes none)
    x = np.array(x, dtype=np.float64)
    out = layer.forward(x)
    upstream = rng.standard_normal(out.shape)

    def loss():
        return float(np.sum(layer.forward(x) * upstream))

    layer.zero_grad()
    layer.forward(x)
    dx = layer.backward(upstream.copy())
    if check_input:
        np.testing.assert_allclose(dx, numerical_gradient(loss, x), rtol=rtol, atol=atol,
                                   err_msg=f"{layer!r}: dL/dx")
    for name, p in layer.named_parameters():
        if p.frozen:
            continue
        analytic = p.grad.copy()
        np.testing.assert_allclose(analytic, numerical_gradient(loss, p.data), rtol=rtol, atol=atol,
                                   err_msg=f"{layer!r}: dL/d{name}")
