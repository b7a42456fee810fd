"""The native GEMMs' epilogues (npcpu.kernels.gemm_epilogue): the bias add and GELU folded into the
write of C, against the separate passes they replace (bit for bit), against a NumPy twin in
float64 (to float32 tolerance), on the float32 and bfloat16 kernels, both layouts of y, odd shapes,
1 and 2 threads; and the MLP, whose hidden gradient is made in c_proj's dx GEMM, against the
unfused chain Linear, GELU, Linear.
"""

import numpy as np
import pytest
from scipy.special import erf

from npcpu import blas, blas_native
from npcpu.kernels.gemm_epilogue import finish_separately
from npcpu.nn import GELU, Linear, MLP
from npcpu.precision import bfloat16, to_storage

# (N, K, M): N < K computes y^T = W x^T (bias per row of C), else y = x W^T (bias per column)
SHAPES = [(1, 3, 5), (13, 17, 31), (33, 31, 13), (70, 129, 45), (255, 13, 17), (768, 128, 512)]
ACTIVATIONS = [None, "gelu", "gelu_tanh"]


def gelu_twin(z, activation):
    """(act(z), act'(z)) in float64."""
    if activation == "gelu":
        cdf = 0.5 * (1 + erf(z / np.sqrt(2)))
        return z * cdf, cdf + z * np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)
    beta, kappa = np.sqrt(2 / np.pi), 0.044715
    t = np.tanh(beta * (z + kappa * z ** 3))
    return 0.5 * z * (1 + t), 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * beta * (1 + 3 * kappa * z * z)


def operands(n, k, m, seed=0):
    rng = np.random.default_rng(seed + n * k * m)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return f32(n, k), f32(m, k), f32(m), f32(n, m), f32(n, k)


def forward_both_ways(gemms, x, w, bias, activation):
    """(z, h) fused, and (z, h) by the plain GEMM and the separate passes."""
    h = np.empty((x.shape[0], w.shape[0]), np.float32) if activation else None
    z = gemms.matmul_weight_transposed(x, w, bias=bias, activation=activation, activation_out=h)
    z_separate = gemms.matmul_weight_transposed(x, w)
    h_separate = np.empty_like(z_separate) if activation else None
    finish_separately(z_separate, bias, activation, h_separate, False)
    return (z, h), (z_separate, h_separate)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("n, k, m", SHAPES)
def test_float32_forward_epilogue_is_the_separate_passes(native_f32_gemm, num_threads, n, k, m,
                                                         activation):
    x, w, bias, _, _ = operands(n, k, m)
    (z, h), (z_separate, h_separate) = forward_both_ways(blas_native.float32, x, w, bias, activation)
    np.testing.assert_array_equal(z, z_separate)
    exact = x.astype(np.float64) @ w.T.astype(np.float64) + bias
    np.testing.assert_allclose(z, exact, rtol=1e-5, atol=1e-5 * np.sqrt(k))
    if activation:
        np.testing.assert_array_equal(h, h_separate)
        np.testing.assert_allclose(h, gelu_twin(z.astype(np.float64), activation)[0], rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("z_dtype", [np.float32, bfloat16])
@pytest.mark.parametrize("n, k, m", SHAPES)
def test_float32_backward_epilogue_is_the_separate_pass(native_f32_gemm, num_threads, n, k, m,
                                                        z_dtype, activation):
    _, w, _, dz, z = operands(n, k, m, seed=1)
    z_kept = to_storage(z, z_dtype)
    native = blas_native.float32
    dx = native.matmul_weight(dz, w, activation=activation, activation_input=z_kept)
    dx_separate = native.matmul_weight(dz, w)
    finish_separately(dx_separate, None, activation, z_kept, True)
    np.testing.assert_array_equal(dx, dx_separate)
    slope = gelu_twin(z_kept.astype(np.float64), activation)[1]
    product = dz.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(dx, product * slope, rtol=1e-5, atol=1e-5 * np.sqrt(m))
    out = np.full_like(dx, np.nan)  # beta = 0 into `out` must not read it
    native.matmul_weight(dz, w, out, 0.0, activation=activation, activation_input=z_kept)
    np.testing.assert_array_equal(out, dx)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("n, k, m", [(13, 17, 31), (70, 128, 45), (768, 128, 512)])
def test_bfloat16_epilogues_are_the_separate_passes(native_bf16_gemm, num_threads, n, k, m,
                                                    activation):
    x, w, bias, dz, z = operands(n, k, m, seed=2)
    x, w = to_storage(x, bfloat16), to_storage(w, bfloat16)
    native = blas_native.bf16
    (z_fused, h), (z_separate, h_separate) = forward_both_ways(native, x, w, bias, activation)
    np.testing.assert_array_equal(z_fused, z_separate)
    np.testing.assert_array_equal(h, h_separate)
    if activation:
        z_kept = to_storage(z, bfloat16)
        dx = native.matmul_weight(dz, w, activation=activation, activation_input=z_kept)
        dx_separate = native.matmul_weight(dz, w)
        finish_separately(dx_separate, None, activation, z_kept, True)
        np.testing.assert_array_equal(dx, dx_separate)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_blas_path_matches_the_native_epilogue(blas_f32_gemm, activation):
    """npcpu.blas without the native kernels takes the separate passes: the same to rounding."""
    x, w, bias, dz, z = operands(70, 129, 45, seed=3)
    h = np.empty((70, 45), np.float32)
    y = blas.matmul_weight_transposed(x, w, bias=bias, activation=activation, activation_out=h)
    exact = x.astype(np.float64) @ w.T.astype(np.float64) + bias
    np.testing.assert_allclose(y, exact, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(h, gelu_twin(y.astype(np.float64), activation)[0], rtol=1e-5,
                               atol=1e-6)
    dx = blas.matmul_weight(dz, w, activation=activation, activation_input=z)
    product = dz.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(dx, product * gelu_twin(z.astype(np.float64), activation)[1],
                               rtol=1e-5, atol=1e-4)


def test_bad_epilogue_arguments_are_named(native_f32_gemm):
    x, w, bias, dz, z = operands(13, 17, 31)
    native = blas_native.float32
    with pytest.raises(ValueError, match="activation must be one of"):
        native.matmul_weight_transposed(x, w, activation="relu")
    with pytest.raises(ValueError, match="activation_out"):
        native.matmul_weight_transposed(x, w, activation="gelu")
    with pytest.raises(ValueError, match=r"bias must have shape \(31,\)"):
        native.matmul_weight_transposed(x, w, bias=bias[:5])
    with pytest.raises(TypeError, match="bias must be float32"):
        native.matmul_weight_transposed(x, w, bias=bias.astype(np.float64))
    with pytest.raises(ValueError, match=r"activation_input must have shape \(13, 17\)"):
        native.matmul_weight(dz, w, activation="gelu", activation_input=z[:5])
    with pytest.raises(TypeError, match="activation_input must be"):
        native.matmul_weight(dz, w, activation="gelu", activation_input=z.astype(np.float64))


def _unfused_mlp_step(mlp, x, dout):
    """The MLP's forward and backward through separate Linear, GELU, Linear layers with its weights."""
    c_fc, c_proj = Linear(*mlp.c_fc.weight.shape[::-1]), Linear(*mlp.c_proj.weight.shape[::-1])
    gelu = GELU(mlp.c_fc.approximate)
    c_fc.load_state_dict(mlp.c_fc.state_dict())
    c_proj.load_state_dict(mlp.c_proj.state_dict())
    for layer in (c_fc, gelu, c_proj):
        layer.input_requires_grad = True
    y = c_proj.forward(gelu.forward(c_fc.forward(x)))
    dx = c_fc.backward(gelu.backward(c_proj.backward(dout)))
    return y, dx, c_fc.weight.grad, c_fc.bias.grad, c_proj.weight.grad


@pytest.mark.parametrize("path", ["native_f32_gemm", "blas_f32_gemm"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mlp_equals_the_unfused_layers(request, num_threads, path, approximate):
    """The fused MLP (c_fc's GELU in its GEMM's write, gelu' in c_proj's dx GEMM's write) gives
    the same bits as Linear, GELU, Linear."""
    request.getfixturevalue(path)
    rng = np.random.default_rng(4)
    mlp = MLP(24, approximate=approximate)
    mlp.input_requires_grad = True
    x = rng.standard_normal((3, 50, 24)).astype(np.float32)
    dout = rng.standard_normal((3, 50, 24)).astype(np.float32)
    y = mlp.forward(x)
    dx = mlp.backward(dout)
    expected = _unfused_mlp_step(mlp, x, dout)
    ours = (y, dx, mlp.c_fc.weight.grad, mlp.c_fc.bias.grad, mlp.c_proj.weight.grad)
    for value, reference in zip(ours, expected):
        np.testing.assert_array_equal(value, reference)
