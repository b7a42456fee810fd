"""Data-parallel training: one model trained by N processes, each on its share of every batch.

The configuration means the same run whatever N is:

- `batch_size` is the global micro-batch. The DataLoader draws the same global order as one
  process (a pure function of (seed, epoch)); rank r serves rows [r n / N, (r+1) n / N) of each
  global batch of n samples (an uneven split is fine; a batch with fewer samples than pieces is
  refused by name).
- Each rank divides its loss by the items of the whole global window (samples; a language
  model's target tokens, npcpu.dist.lm), so the sum of the ranks' gradients is the gradient of
  the global mean loss (weighted by items, not an average of means).
- Dropout masks are keyed by the global row (Dropout.row_offset); stochastic rounding of an update
  is keyed by (seed, step, element), and every rank updates with the same summed gradient, so
  every rank rounds alike. Parameters are broadcast from rank 0 at the start and their hashes
  compared at each checkpoint.
- `deterministic`: the sum of the gradients and losses is added in a fixed order that does not
  depend on N (npcpu.dist.reduce.OrderedSum), giving bitwise the same run for every N that divides
  `parts`; otherwise MPI's all-reduce adds them, or with every rank on one node, each rank adds
  its range of all the ranks' buffers in shared memory (npcpu.dist.node): equal to float32
  rounding.

Only rank 0 prints, writes the metrics file and checkpoints (after every rank checked the
parameter hashes, so a checkpoint is whole or absent); the other ranks then call on_checkpoint
with the path it wrote. A checkpoint holds nothing about N: a run resumes with any number of
processes. `shard_optimizer`: each range of the parameters' optimizer step and state on one
rank (npcpu.dist.shard).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from npcpu.data.loader import DataLoader
from npcpu.dist.node import SharedMemorySum, one_node
from npcpu.dist.reduce import (BackwardReducer, GradientBuckets, OrderedSum, SpanSums,
                               broadcast_parameters, check_parameters_equal, sum_in_order)
from npcpu.dist.shard import OptimizerShard
from npcpu.dist.world import World, wait
from npcpu.nn.dropout import Dropout
from npcpu.train.runners import ReferenceRunner
from npcpu.train.trainer import Trainer

PATH_BYTES = 4096  # room for the checkpoint path rank 0 sends the others (PATH_MAX on Linux)


class DataParallelTrainer(Trainer):
    """A Trainer whose steps run across the processes of `world` (module docstring).

    Parameters (besides Trainer's)
    ----------
    world : npcpu.dist.World
    deterministic : bool
        Add the ranks' gradients in a fixed order (bitwise the same for every N dividing `parts`).
    parts : int
        With `deterministic`: the pieces every global micro-batch is cut into (each its own
        forward and backward), a multiple of the world size.
    timeout : float
        Seconds a rank waits for the others in any collective before raising TimeoutError.
    bucket_mb : float
        Size of the gradient buckets reduced in one call, in MB.
    overlap : bool
        Start each bucket's reduction during backward, as soon as its gradients are finished
        (npcpu.dist.reduce.BackwardReducer); else after backward. Only for MPI's all-reduce (not
        in deterministic mode, nor with the shared-memory sum).
    shard_optimizer : bool
        Each range of the parameters' elements stepped (and its optimizer state kept) by one rank
        only, the updated parameters published (npcpu.dist.shard: ZeRO stage 1 by ranges of
        elements); bitwise the same run. Without deterministic sums or a loss scaler, each rank
        then receives only its range's summed gradients (a reduce-scatter).
    shared_memory : bool
        When every rank is on one node, sum the gradients (and publish sharded parameters)
        through the node's shared memory (npcpu.dist.node) instead of MPI's collectives.
    """

    def __init__(self, model, loss_fn, optimizer, *, world: World, deterministic: bool = False,
                 parts: int = 12, timeout: float = 60.0, bucket_mb: float = 25.0,
                 overlap: bool = True, shard_optimizer: bool = False, shared_memory: bool = True,
                 **kwargs):
        if kwargs.get("update_in_backward") or getattr(optimizer, "fused_into_backward", False):
            raise ValueError("DataParallelTrainer: update_in_backward cannot be used: the ranks' "
                             "gradients must be summed before any update")
        super().__init__(model, loss_fn, optimizer, **kwargs)
        if self.compiled == "on":
            raise ValueError("DataParallelTrainer: compiled='on' does not apply: the compiled "
                             "step runs in one process")
        if deterministic and parts % world.size:
            raise ValueError(f"DataParallelTrainer: dist.parts ({parts}) must be a multiple of the "
                             f"world size ({world.size}) in deterministic mode")
        self.world = world
        self.deterministic = bool(deterministic)
        self.parts = parts if deterministic else world.size
        self.timeout = float(timeout)
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.overlap = bool(overlap) and not self.deterministic and world.size > 1
        self.shard_optimizer = bool(shard_optimizer) and world.size > 1
        self.shared_memory = bool(shared_memory) and one_node(world) and not self.deterministic
        self.optimizer_shard = None  # the OptimizerShard of the running fit(), when sharded
        self.writes_files = world.is_root
        if not world.is_root:
            self.log_stream = open(os.devnull, "w")  # noqa: SIM115  (lives as long as the trainer)
        self._pending_interrupt = None

    # Signals reach each rank at its own moment: the handler's value waits here until every rank
    # has heard of it at the same step (DataParallelRunner.forward_backward), so all stop together.
    @property
    def interrupted(self):
        return self._agreed_interrupt

    @interrupted.setter
    def interrupted(self, value):
        if value is None:
            self._agreed_interrupt = self._pending_interrupt = None
        else:
            self._pending_interrupt = value

    def interrupt_pending(self) -> bool:
        """A signal reached this rank and the ranks have not yet agreed to stop."""
        return self._pending_interrupt is not None

    def agree_to_stop(self) -> None:
        """Some rank had a signal pending at this step: every rank stops after it."""
        if self._agreed_interrupt is None:
            self._agreed_interrupt = self._pending_interrupt or "a signal to another rank"

    def sums_to_owners(self) -> bool:
        """Sharded, each rank receives only its own range's summed gradients: not with
        deterministic sums, nor with a loss scaler (its check reads every gradient)."""
        return self.shard_optimizer and not self.deterministic and \
            (self.loss_scaler is None or not self.loss_scaler.enabled)

    def header(self) -> str:
        import numba
        collective = "reduce-scatter to the owners" if self.sums_to_owners() else "all-reduce"
        how = (f"deterministic: a fixed-order sum over {self.parts} pieces of each batch"
               if self.deterministic else "this node's shared memory after backward"
               if self.shared_memory else collective + (" overlapped with backward"
                                                        if self.overlap else " after backward"))
        return (super().header() + f"\ndata parallel: world size {self.world.size} | threads per "
                f"rank {numba.get_num_threads()} | gradients summed by {how}")

    def make_runner(self, loader: DataLoader, log_every: int) -> DataParallelRunner:
        return DataParallelRunner(self, loader)

    # -- evaluation: each rank its share of the batches, gathered and added in batch order ----------
    def evaluate(self, data, batch_size: int = 512) -> dict:
        loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size, shuffle=False)
        batches, size, rank = len(loader), self.world.size, self.world.rank
        if batches < size:  # too few to share: every rank evaluates them all
            return super().evaluate(loader)
        first, stop = rank * batches // size, (rank + 1) * batches // size
        mine = self.evaluate_batches(loader, first, stop)
        names = sorted(mine[0][1])
        slots = np.zeros((batches, 1 + len(names)))
        for i, (loss, sums) in enumerate(mine):
            slots[first + i] = [loss, *(sums[name] for name in names)]
        sum_in_order(self.world, slots, self.timeout)
        kinds = [type(mine[0][1][name]) for name in names]
        per_batch = [(float(row[0]), {name: kind(value) for name, kind, value
                                      in zip(names, kinds, row[1:])}) for row in slots]
        return self.evaluation_metrics(per_batch, len(loader.dataset))

    def _evaluate_and_report(self, eval_data, batch_size, callbacks) -> None:
        """Sharded: the slow weights evaluated on published by their owners first; and on one
        node each rank evaluates on its own copy of the parameters (Lookahead swaps the slow
        weights into them in place, each rank at its own pace; the next step attaches them to
        the shared copy again: npcpu.dist.node.SharedParameters)."""
        shard = self.optimizer_shard
        if shard is not None:
            shard.publish_slow_weights()
            if shard.shared is not None:
                shard.shared.detach()
        super()._evaluate_and_report(eval_data, batch_size, callbacks)

    # -- checkpoints: hashes compared, then rank 0 writes while the others wait ---------------------
    def _checkpoint(self, run_dir, keep_last: int, callbacks) -> Path:
        """Rank 0 writes; then every other rank calls the callbacks' on_checkpoint with the path
        rank 0 wrote, so that a callback acting there (stopping the run, say) acts on every rank
        alike."""
        check_parameters_equal(self.world, self.model.parameters(), self.timeout,
                               f"checkpoint at step {self.step}")
        shard = self.optimizer_shard
        if shard is not None:
            shard.gather_state()
        path = super()._checkpoint(run_dir, keep_last, callbacks) if self.world.is_root else None
        if shard is not None:
            shard.drop_others_state()
        self._saved_step = self.step
        if self.world.size > 1:
            written = np.zeros(PATH_BYTES, dtype=np.uint8)  # rank 0's path, UTF-8, zero-padded
            if path is not None:
                encoded = np.frombuffer(str(path).encode(), dtype=np.uint8)[:PATH_BYTES]
                written[:encoded.size] = encoded
            wait(self.world, [self.world.comm.Ibcast(written, root=0)], self.timeout,
                 f"rank 0 writing the checkpoint of step {self.step}")
            if path is None:
                path = Path(written.tobytes().rstrip(b"\0").decode())
                for cb in callbacks:
                    cb.on_checkpoint(self, path)
        return path


class DataParallelRunner(ReferenceRunner):
    """The reference step on this rank's rows of each global batch, the gradients, losses and
    stop requests summed over the ranks before the optimizer step (the same on every rank)."""

    def __init__(self, trainer: DataParallelTrainer, loader, note: str = "data-parallel step"):
        world, parts = trainer.world, trainer.parts
        self.first_part = world.rank * parts // world.size
        self.stop_part = (world.rank + 1) * parts // world.size
        smallest = self.smallest_batch(loader)
        if smallest < parts:
            what = "pieces (dist.parts)" if trainer.deterministic else "ranks"
            raise ValueError(f"DataParallelTrainer: batch {len(loader) - 1} of an epoch has "
                             f"{smallest} samples, fewer than the {parts} {what} it is split "
                             f"into: choose a batch size and data size whose every batch has "
                             f"at least {parts} samples")
        trainer.optimizer_shard = OptimizerShard(trainer.optimizer, trainer.model.parameters(),
                                                 world, trainer.timeout, trainer.shared_memory) \
            if trainer.shard_optimizer else None
        if trainer.optimizer_shard is not None:
            note += f"; {trainer.optimizer_shard.describe()}"
        super().__init__(trainer, self.shard(loader), note=f"{note}: {world.describe()}")
        params = trainer.model.parameters()
        shard = trainer.optimizer_shard
        shared = shard.shared if shard is not None else None  # rank 0's values already
        broadcast_parameters(world, [p for p in params if shared is None or not shared.holds(p)],
                             trainer.timeout)
        self.node_sum = SharedMemorySum(world, params, shard and shard.spans(), trainer.timeout,
                                        shard and shard.chunk_starts) \
            if trainer.shared_memory else None
        self.summed_squares = None  # the owners' chunks' sums of squares, from the gradient sum
        # each owner alone reads its summed gradients, unless the loss scaler checks them all
        self.scatter = shard is not None and trainer.sums_to_owners()
        self.buckets = self.node_sum.buckets if self.node_sum is not None else \
            GradientBuckets(params, trainer.bucket_bytes)
        self.span_sums = SpanSums(self.buckets, shard.spans(), world.rank) \
            if self.scatter and self.node_sum is None else None
        self.ordered = OrderedSum(self.buckets, self.stop_part - self.first_part) \
            if trainer.deterministic else None
        self.reducer = BackwardReducer(self.buckets, world, self.span_sums) \
            if trainer.overlap and self.node_sum is None else None
        self.dropouts = [m for m in trainer.model.modules() if isinstance(m, Dropout)]
        self._window_batches = range(0)

    def close(self) -> None:
        """Also the parameters out of this node's window, if they are in one (a later fit of a
        model of the same size reuses it: npcpu.dist.node.SharedParameters.detach)."""
        super().close()
        shard = self.trainer.optimizer_shard
        if shard is not None and shard.shared is not None:
            shard.shared.detach()

    def rows_of_batch(self, n: int) -> tuple[int, int]:
        """This rank's rows of a global batch of n samples: its pieces' rows."""
        parts = self.trainer.parts
        return self.first_part * n // parts, self.stop_part * n // parts

    # -- what a runner for other data overrides (npcpu.dist.lm) -------------------------------------
    def smallest_batch(self, loader: DataLoader) -> int:
        """Samples of the smallest global micro-batch `loader` serves."""
        return loader.batch_size if loader.drop_last else loader.batch_size_of(len(loader) - 1)

    def shard(self, loader: DataLoader) -> DataLoader:
        """The loader this rank draws from: the same global order, only this rank's rows."""
        return DataLoader(loader.dataset, loader.batch_size, shuffle=loader.shuffle,
                          seed=loader.seed, drop_last=loader.drop_last,
                          prefetch=loader.prefetch, rows_of_batch=self.rows_of_batch)

    def split_window(self, window: list) -> tuple[list, list[int], int]:
        """(this rank's rows of each micro-batch of `window`, each micro-batch's global samples,
        the items the global window's loss is the mean over). The sharded loader served this
        rank's rows already; the global sizes are the loader's."""
        sizes = [self.loader.batch_size_of(b) for b in self._window_batches]
        return window, sizes, sum(sizes)

    def _next_window(self) -> list:
        window = super()._next_window()
        stop = self.trainer.batch_index
        self._window_batches = range(stop - len(window), stop)
        return window

    def forward_backward(self, window: list) -> tuple[float, int]:
        """(the global window's mean loss, its items), the summed gradients in the parameters."""
        trainer, parts = self.trainer, self.trainer.parts
        window, sizes, items = self.split_window(window)
        slots = np.zeros(len(window) * parts + 1)  # one loss per (micro-batch, piece), then stop
        for m, ((x, y), n) in enumerate(zip(window, sizes)):
            if self.ordered is None:  # the rank's rows in one pass, summed by the all-reduce
                if self.reducer is not None and m == len(window) - 1:
                    self.reducer.arm(first_of_window=m == 0)
                self._set_row_offset(self.first_part * n // parts)
                slots[m * parts + self.first_part] = self.micro_batch(x, y, items, window)
                continue
            base = self.first_part * n // parts
            calls = [layer.calls for layer in self.dropouts]  # one mask stream per micro-batch
            for j, part in enumerate(range(self.first_part, self.stop_part)):
                start, stop = part * n // parts, (part + 1) * n // parts
                for p in trainer.model.parameters():
                    p.zero_grad()
                for layer, stream in zip(self.dropouts, calls):
                    layer.calls = stream
                self._set_row_offset(start)
                slots[m * parts + part] = self.micro_batch(x[start - base:stop - base],
                                                           y[start - base:stop - base], items, window)
                self.ordered.keep(j, first=m == 0)
        slots[-1] = trainer.interrupt_pending()
        sum_in_order(trainer.world, slots, trainer.timeout)
        if slots[-1]:
            trainer.agree_to_stop()
        loss = 0.0
        for value in slots[:-1]:
            loss += float(value)
        self.summed_squares = None
        if self.ordered is not None:
            self.ordered.reduce(trainer.world, trainer.timeout)
        elif self.node_sum is not None and self.scatter:  # and the norm's sums of squares
            self.summed_squares = self.node_sum.reduce_scatter(squares=True)
        elif self.node_sum is not None:
            self.node_sum.allreduce()
        elif self.reducer is not None:
            self.reducer.finish(trainer.timeout)
        elif self.span_sums is not None:
            self.span_sums.reduce(trainer.world, trainer.timeout)
        elif trainer.world.size > 1:
            self.buckets.allreduce(trainer.world, trainer.timeout)
        if self.scatter and not math.isfinite(loss):  # every gradient, for the error
            self.gather()
        return loss, items

    def gather(self) -> None:
        """After a reduce-scatter to the owners: every rank's gradients whole (the summed spans
        from their owners)."""
        if self.node_sum is not None:
            self.node_sum.allgather()
        else:
            self.span_sums.gather(self.trainer.world, self.trainer.timeout)

    def _grad_norm(self, params: list, check: bool) -> float:
        """Sharded: the norm summed by the owners, only this rank's own gradients clipped
        (npcpu.dist.shard). Reduce-scattered with a non-finite norm: the summed gradients
        gathered whole for the error naming the first non-finite layer."""
        shard = self.trainer.optimizer_shard
        if shard is None:
            return super()._grad_norm(params, check)
        summed, self.summed_squares = self.summed_squares, None
        norm = shard.gradient_norm(params, self.trainer.clip_grad_norm, check,
                                   keep_squares=self.trainer.freezer is not None,
                                   summed_squares=summed)
        if self.scatter and not math.isfinite(norm):
            self.gather()
        return norm

    def observe_for_freezing(self) -> list:
        """Sharded: the layers' gradient norms from the owners' sums of squares."""
        shard, trainer = self.trainer.optimizer_shard, self.trainer
        if shard is None:
            return super().observe_for_freezing()
        return trainer.freezer.observe(trainer.model, trainer.step + 1, shard.norm_of)

    def take_step(self) -> bool:
        """The optimizer step; sharded, each rank's own pieces, then published by their owners."""
        shard = self.trainer.optimizer_shard
        if shard is None:
            return super().take_step()
        with shard.own_share_only():
            stepped = super().take_step()
        if stepped:  # the same on every rank: the loss scaler saw the same summed gradients
            shard.publish_parameters()
        return stepped

    def _set_row_offset(self, rows: int) -> None:
        for layer in self.dropouts:
            layer.row_offset = rows
