"""One comparison of nested training states (checkpoints, Trainer.state_dict) for the resume tests."""

import numpy as np


def assert_same_state(a, b, path="state"):
    """a and b are the same tree of dicts, lists and values, with bitwise-equal arrays (dtype and
    bytes) and equal scalars (NaN equal to NaN); `path` names the first difference."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)), path
    else:
        assert a == b or (a != a and b != b), path
