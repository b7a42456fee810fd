"""Data-parallel language-model training: npcpu.train.lm's step and evaluation across the ranks.

Every rank draws each global micro-batch whole (a (seed, step)-addressed batch of token windows
costs little next to the model), counts the target tokens of the whole window there (the items
the loss is the mean over: the same on every rank, without a message), and runs forward and
backward on its own rows, [r n / N, (r+1) n / N) as in npcpu.dist.trainer. The gradients, losses
and stop requests are then summed as for any model.

Evaluation: rank r takes every N-th evaluation batch; the summed token losses and token counts
are gathered and added in batch order, the order one process adds them in.
"""

from __future__ import annotations

import numpy as np

from npcpu.dist.reduce import sum_in_order
from npcpu.dist.trainer import DataParallelRunner, DataParallelTrainer
from npcpu.train.lm import LanguageModelBatches, LanguageModelRunner, LanguageModelTrainer


class DataParallelLanguageModelRunner(DataParallelRunner, LanguageModelRunner):
    """DataParallelRunner with LanguageModelRunner's items (target tokens) on whole batches."""

    def smallest_batch(self, loader: LanguageModelBatches) -> int:
        return loader.batch_size  # every batch of such a data set is full

    def shard(self, loader: LanguageModelBatches) -> LanguageModelBatches:
        return loader  # whole batches: split_window takes this rank's rows

    def split_window(self, window: list) -> tuple[list, list[int], int]:
        sizes = [len(y) for _, y in window]
        rows = [self.rows_of_batch(n) for n in sizes]
        mine = [(x[start:stop], y[start:stop]) for (x, y), (start, stop) in zip(window, rows)]
        return mine, sizes, self.window_items(window)


class DataParallelLanguageModelTrainer(DataParallelTrainer, LanguageModelTrainer):
    """LanguageModelTrainer's training and evaluation across the ranks of `world` (arguments:
    DataParallelTrainer's and LanguageModelTrainer's)."""

    def make_runner(self, loader: LanguageModelBatches, log_every: int):
        return DataParallelLanguageModelRunner(
            self, loader, note="data-parallel language-model step: token-level loss")

    def evaluate(self, data, batch_size: int | None = None) -> dict:
        size, rank = self.world.size, self.world.rank
        mine = self.evaluation_losses(data, keep=lambda batch: batch % size == rank)
        slots = np.zeros((len(mine), 2))  # (summed loss, tokens) of each batch, from its rank
        for batch, result in enumerate(mine):
            if result is not None:
                slots[batch] = result
        sum_in_order(self.world, slots, self.timeout)
        return self.language_model_metrics(data, [(float(loss), int(tokens))
                                                  for loss, tokens in slots])
