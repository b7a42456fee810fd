"""npcpu.allocator: freed memory is reused without page faults once retain_freed_memory ran."""

import os
import platform
import subprocess
import sys

import pytest

CHILD = """
import resource, sys
import numpy as np
from npcpu.allocator import retain_freed_memory

def faults(count, size_mb):
    # `count` arrays of size_mb alive at once, written, then freed (a step's temporaries), twice
    # over; the minor page faults of the second pass
    for _ in range(2):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        arrays = [np.ones(size_mb << 18, np.float32) for _ in range(count)]
        del arrays
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

if sys.argv[1] == "retain":
    assert retain_freed_memory()
elif sys.argv[1] == "user settings":
    assert not retain_freed_memory()
print(faults(24, 1))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc only")
def test_freed_arrays_are_reused_without_page_faults():
    def run(mode, **env):
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                             check=True, env={**os.environ, **env})
        return int(out.stdout.strip().splitlines()[-1])
    pages = 24 << 8  # 4 KB pages written per pass
    assert run("default") > pages // 2  # glibc's own thresholds: the freed heap top is trimmed
    assert run("retain") < pages // 100  # every block is reused from the heap
    # the environment's own malloc settings win (here: return every freed block at once)
    assert run("user settings", MALLOC_MMAP_THRESHOLD_="65536",
               MALLOC_TRIM_THRESHOLD_="65536") > pages // 2


def test_elsewhere_it_changes_nothing(monkeypatch):
    from npcpu import allocator

    monkeypatch.setattr(allocator.platform, "system", lambda: "Darwin")
    allocator.retain_freed_memory.cache_clear()
    try:
        assert allocator.retain_freed_memory() is False
    finally:
        allocator.retain_freed_memory.cache_clear()
