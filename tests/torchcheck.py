"""One comparison of a module's forward and backward with torch's, for the parity tests."""

import numpy as np

RTOL, ATOL = 1e-5, 1e-6  # float32: the two libraries sum in different orders


def assert_forward_backward_match_torch(torch, module, reference, x, upstream):
    """Run module.forward(x) and module.backward(upstream), and the same through the torch module
    `reference` with `upstream` as dL/dy; assert that y and dL/dx agree to float32 tolerance.
    The parameter gradients are left in both modules for the caller to compare."""
    module.input_requires_grad = True  # as x_t below: a module used alone computes no dL/dx otherwise
    y = module.forward(x)
    dx = module.backward(upstream)
    x_t = torch.from_numpy(x).requires_grad_(True)
    y_t = reference(x_t)
    (y_t * torch.from_numpy(upstream)).sum().backward()
    np.testing.assert_allclose(y, y_t.detach().numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dx, x_t.grad.numpy(), rtol=RTOL, atol=ATOL)
