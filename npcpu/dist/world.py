"""The processes of a data-parallel run: rank, world size, ranks on this node, threads per rank.

mpi4py is imported only when a run needs it: under a launcher (mpiexec, srun) that started more
than one process, or when asked. A run under a launcher without mpi4py stops with the line that
installs it. A process that raises takes the whole job down (MPI_Abort) after printing its error
with its rank, so that no other rank waits forever for it; waits on other ranks have a timeout
(`wait`), for a rank that dies without raising.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np

INSTALL_HINT = "pip install 'npcpu[mpi]'"
# (rank variable, world-size variable) of the launchers: MPICH/Intel MPI (PMI), Open MPI, PMIx, Slurm
LAUNCHER_VARIABLES = (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                      ("PMIX_RANK", None), ("SLURM_PROCID", "SLURM_NTASKS"))


@dataclass(frozen=True)
class World:
    """This process's place in the run. `comm` is mpi4py's COMM_WORLD, None in a single process."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    comm: object = None

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def threads_per_rank(self, override: int | None = None) -> int:
        """`override`, else the cores this process may use divided among the ranks on its node
        (at least 1). A launcher that binds each rank to one core (Open MPI by default) leaves
        one core to each."""
        if override is not None:
            return override
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, min(usable, (os.cpu_count() or 1) // self.local_size))

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}"


def launcher_world_size() -> tuple[str, int] | None:
    """(the launcher's rank variable, the world size it gives, 0 when unknown) when this process
    was started by a launcher, else None."""
    for rank_var, size_var in LAUNCHER_VARIABLES:
        if rank_var in os.environ:
            size = os.environ.get(size_var or "", "")
            return rank_var, int(size) if size.isdigit() else 0
    return None


def init_world(require_mpi: bool = False) -> World:
    """The World of this process: from MPI when a launcher started several processes (or
    `require_mpi`), else a single process without importing mpi4py."""
    launched = launcher_world_size()
    if not require_mpi and (launched is None or launched[1] == 1):
        return World()
    try:
        from mpi4py import MPI
    except ImportError:
        how = f"by a launcher ({launched[0]} is set)" if launched else "with MPI asked for"
        raise ImportError(f"npcpu: this process was started {how} but mpi4py is not installed; "
                          f"install the MPI extra: {INSTALL_HINT}") from None
    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    world = World(comm.Get_rank(), comm.Get_size(), node.Get_rank(), node.Get_size(), comm)
    node.Free()
    if world.size > 1:
        _abort_on_uncaught(world)
    return world


ABORT_GRACE_SECONDS = 1.0
"""How long a failing rank waits between printing its error and MPI_Abort: the launcher forwards
each rank's output asynchronously, and an abort can tear the job down before the failing rank's
last lines have been forwarded (the user would then see the job end without being told why)."""


def abort(world: World, message: str, code: int = 1) -> None:
    """Print `message` with this rank and end every process of the job (MPI_Abort)."""
    print(f"npcpu {world.describe()}: {message}; aborting all {world.size} ranks",
          file=sys.stderr, flush=True)
    time.sleep(ABORT_GRACE_SECONDS)
    world.comm.Abort(code)


def _abort_on_uncaught(world: World) -> None:
    """An exception nothing caught ends the job, not only this rank (the others would wait)."""
    def hook(kind, error, tb):
        traceback.print_exception(kind, error, tb)
        abort(world, f"{kind.__name__}: {error}")

    sys.excepthook = hook


@contextlib.contextmanager
def abort_on_error(world: World):
    """Within it, an exception on one rank of several ends the job with an error naming the rank
    (code that catches errors to print them, like the command line, would otherwise exit this
    rank alone and leave the others waiting)."""
    try:
        yield
    except BaseException as error:
        if world.size > 1 and not isinstance(error, SystemExit):
            if os.environ.get("NPCPU_DEBUG") == "1":
                traceback.print_exc()
            abort(world, f"{type(error).__name__}: {error}")
        raise


PAUSE_SECONDS = 1e-5
"""The sleep between two tests of the requests `wait` waits for: MPI moves a non-blocking
collective on only inside MPI calls (a test), so that a longer sleep stalls a large transfer
(over TCP between hosts, sleeps doubling up to 0.1 ms or 1 ms made the step slower, not faster:
the tests do not compete with the kernel's TCP work); a sleep at all leaves the core to a rank
that shares it."""

TIMEOUT_TAG = 31_415
"""The tag of the notices a rank sends to the others when one of its waits times out."""
NOTICE_SECONDS = 5.0
"""How long a rank that timed out waits for the others' notices before naming the silent ones."""


def wait(world: World, requests: list, timeout: float, what: str) -> None:
    """Complete the non-blocking MPI `requests`, or raise TimeoutError after `timeout` seconds
    naming `what` and the ranks that did not time out too (`silent_ranks`: they hang, died, or
    took another path)."""
    from mpi4py import MPI
    deadline = time.monotonic() + timeout
    while not MPI.Request.Testall(requests):
        if time.monotonic() > deadline:
            silent = silent_ranks(world, min(timeout, NOTICE_SECONDS))
            raise TimeoutError(f"{world.describe()}: {what} did not complete within {timeout:g} s; "
                               f"rank(s) {silent} did not time out too within "
                               f"{min(timeout, NOTICE_SECONDS):g} s more: they hang, died, or "
                               "are at another step")
        time.sleep(PAUSE_SECONDS)


def silent_ranks(world: World, seconds: float) -> list[int]:
    """After a timed-out wait: tell every other rank so (a notice on TIMEOUT_TAG), and return the
    ranks whose own notice did not arrive within `seconds`. Ranks blocked in the same collective
    time out about together and answer; a hung or dead rank cannot."""
    from mpi4py import MPI
    mine = np.array([world.rank], dtype=np.int64)
    others = [r for r in range(world.size) if r != world.rank]
    sends = [world.comm.Isend(mine, dest=r, tag=TIMEOUT_TAG) for r in others]
    heard, notice = set(), np.empty(1, dtype=np.int64)
    deadline = time.monotonic() + seconds
    status = MPI.Status()
    while time.monotonic() < deadline and len(heard) < len(others):
        if world.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TIMEOUT_TAG, status=status):
            world.comm.Recv(notice, source=status.Get_source(), tag=TIMEOUT_TAG)
            heard.add(int(notice[0]))
        else:
            time.sleep(1e-3)
    _UNFINISHED_NOTICES.append((mine, sends))  # the send to a hung rank never completes
    return [r for r in others if r not in heard]


_UNFINISHED_NOTICES: list = []  # kept alive (buffers MPI may still read) until the job ends
