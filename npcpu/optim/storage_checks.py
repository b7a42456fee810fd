"""The checks that keep a 16-bit parameter's storage finite after an optimizer update.

- With a float32 master copy, the new values are checked before they are rounded into the
  parameter (`check_storable`): a value from the overflow threshold on (float16: 65520) would round
  to Inf, so it is refused and not stored.
- Updated in place (bfloat16 without a master copy), the parameter is checked after its update
  (`check_updated_in_place`, on the 16-bit patterns): the value is already stored, so the run stops.

Either way the optimizer state already holds the update: the error names the parameter and the run
must stop there; its last checkpoint is untouched.
"""

import numpy as np

from npcpu.kernels.finite import EXPONENT_MASKS_16, count_nonfinite_bits
from npcpu.kernels.grads import max_abs
from npcpu.nn.parameter import Parameter
from npcpu.precision import overflow_threshold

_EXPONENT_MASKS = {np.dtype(name): mask for name, mask in EXPONENT_MASKS_16.items()}
"""The masks by dtype rather than by name: this runs after every update, and a dtype's `.name` is
built by Python code on each access."""


def check_storable(owner: str, p: Parameter, values: np.ndarray) -> None:
    """Raise FloatingPointError, naming `p`, when a master-copy value would round to Inf in p's
    16-bit storage."""
    threshold = overflow_threshold(p.data.dtype)
    peak = max_abs(values) if values.size else 0.0
    if peak >= threshold:
        raise FloatingPointError(
            f"{owner}: the update of {p!r} overflows {p.data.dtype}: a value of magnitude "
            f"{peak:.6g} would round to Inf (from {threshold:.6g} on); not stored into the "
            "parameter. Lower the learning rate or keep this parameter in float32.")


def check_updated_in_place(owner: str, p: Parameter, first: int, stop: int) -> None:
    """Raise FloatingPointError, naming `p`, when a 16-bit parameter updated in place now holds Inf
    or NaN in elements first .. stop - 1: an update that rounded to Inf, or a non-finite gradient
    (updates inside backward check the loss, not the gradients). Other dtypes pass."""
    mask = _EXPONENT_MASKS.get(p.data.dtype)
    if mask is None:
        return
    bits = p.data.reshape(-1)[first:stop].view(np.uint16)
    bad = count_nonfinite_bits(bits, mask) if bits.size else 0
    if bad:
        raise FloatingPointError(
            f"{owner}: the update of {p!r} in place left {bad} of its {bits.size} "
            f"{p.data.dtype} values Inf or NaN (an update too large for {p.data.dtype}, or a "
            "non-finite gradient). Lower the learning rate, or keep a float32 master copy "
            "(master_weights=True) or this parameter in float32.")
