"""Language-model training through the Trainer: (seed, step)-addressed batches, token-level loss.

The data sets of npcpu.text (TextDataset, SyntheticText) serve batch(counter, B) -> (x, y) as a
pure function of (seed, counter): nothing is shuffled and nothing is replayed on resume.

    LanguageModelBatches   the loader face of such a data set for Trainer.fit: micro-batch b of
                           epoch e is data.batch(e * len + b, B), so the trainer's saved
                           (epoch, batch_index) alone fixes every later batch (exact resume).
    LanguageModelRunner    the reference step (npcpu.train.runners) whose items are target tokens:
                           each micro-batch's summed token loss is divided by the non-ignored
                           targets of the whole window, so the step's loss is the mean over the
                           window's tokens and k micro-batches give the gradient of one batch of
                           k times the size, exactly.
    LanguageModelTrainer   a Trainer with that loader and runner, an evaluation over the data
                           set's fixed evaluation windows (loss, perplexity, bits per byte for
                           char and byte tokenizers; the entropy floor for SyntheticText), and
                           tokens/s in the metrics (samples_seen counts tokens).
"""

from __future__ import annotations

import numpy as np

from npcpu.allocator import retain_freed_memory
from npcpu.checks import check_int
from npcpu.train.callbacks import Callback
from npcpu.train.runners import ReferenceRunner
from npcpu.train.trainer import Trainer

# Elements of one evaluation batch's logits (B * T * V): a bound on evaluation memory, since the
# loss keeps a gradient buffer of the same size.
EVAL_LOGITS_BUDGET = 1 << 24


class LanguageModelBatches:
    """Micro-batches of `batch_size` windows of a (seed, step)-addressed data set.

    `windows_per_epoch` sets len(self) = ceil(windows_per_epoch / batch_size) micro-batches per
    epoch: for a TextDataset the default is the training split cut into block_size pieces (an
    "epoch" then reads about as many tokens as the split holds, windows drawn at random places).
    """

    def __init__(self, dataset, batch_size: int, windows_per_epoch: int | None = None):
        self.dataset = dataset
        self.batch_size = check_int("LanguageModelBatches", "batch_size", batch_size, 1)
        if windows_per_epoch is None:
            if not hasattr(dataset, "train_tokens"):
                raise ValueError(f"LanguageModelBatches: give windows_per_epoch for a "
                                 f"{type(dataset).__name__} (it has no training split)")
            windows_per_epoch = max(1, (dataset.train_tokens.shape[0] - 1) // dataset.block_size)
        self.windows_per_epoch = check_int("LanguageModelBatches", "windows_per_epoch",
                                           windows_per_epoch, 1)

    def __len__(self) -> int:
        return -(-self.windows_per_epoch // self.batch_size)

    def iter_from(self, epoch: int, batch_index: int):
        """Micro-batches batch_index ... len - 1 of `epoch` (a generator: close() ends it)."""
        first = epoch * len(self)
        for b in range(batch_index, len(self)):
            yield self.dataset.batch(first + b, self.batch_size)


class LanguageModelRunner(ReferenceRunner):
    """The reference step with the window's target tokens as its items (module docstring)."""

    def window_items(self, window: list) -> int:
        ignore = self.trainer.loss_fn.ignore_index
        return sum(int(np.count_nonzero(y != ignore)) for _, y in window)


class TokensPerSecond(Callback):
    """Names the step metrics' rate for what a language model's items are: tokens."""

    def on_step_end(self, trainer, metrics: dict) -> None:
        metrics["tokens_per_s"] = metrics["samples_per_s"]


class LanguageModelTrainer(Trainer):
    """A Trainer for a model mapping (B, T) token ids to (B, T, V) logits, with a
    CrossEntropyLoss and a data set of npcpu.text's contract (module docstring). Arguments as
    Trainer's; fit() takes the data set (or a LanguageModelBatches) as train_data and eval_data."""

    def __init__(self, model, loss_fn, optimizer, **kwargs):
        retain_freed_memory()  # each step reuses the previous step's pages (npcpu.allocator)
        callbacks = [TokensPerSecond(), *kwargs.pop("callbacks", ())]
        super().__init__(model, loss_fn, optimizer, callbacks=callbacks, compiled="off", **kwargs)
        if not hasattr(loss_fn, "ignore_index"):
            raise TypeError(f"LanguageModelTrainer: the loss must be a CrossEntropyLoss (token "
                            f"targets with an ignore_index), got {type(loss_fn).__name__}")

    def make_loader(self, train_data, batch_size: int):
        if isinstance(train_data, LanguageModelBatches):
            return train_data
        return LanguageModelBatches(train_data, batch_size)

    def make_runner(self, loader, log_every: int):
        return LanguageModelRunner(self, loader, note="language-model step: token-level loss, "
                                   "batches addressed by (seed, step)")

    def eval_batch_size(self, data) -> int:
        """Windows per evaluation batch: as many as keep the logits within EVAL_LOGITS_BUDGET."""
        return max(1, min(64, EVAL_LOGITS_BUDGET // (data.block_size * self.model_vocab_size())))

    def model_vocab_size(self) -> int:
        config = getattr(self.model, "config", None)
        return int(getattr(config, "vocab_size", 1))

    def evaluate(self, data, batch_size: int | None = None) -> dict:
        """Every evaluation window of `data` once: "eval_loss" (mean over the target tokens),
        "eval_perplexity", and what data.metrics adds ("eval_bits_per_byte", ...), on the weights
        the optimizer evaluates. `batch_size` is ignored: eval_batch_size bounds the memory."""
        return self.language_model_metrics(data, self.evaluation_losses(data))

    def evaluation_losses(self, data, keep=None) -> list:
        """[(summed token loss, target tokens)] of each evaluation batch of `data` in order, on the
        weights the optimizer evaluates; None for a batch whose index `keep(index)` rejects (a
        data-parallel trainer evaluates its share and gathers the others' results)."""
        ignore = self.loss_fn.ignore_index
        results = []
        self.model.eval()
        try:
            with self.optimizer.evaluation_weights():
                for index, (x, y) in enumerate(data.eval_batches(self.eval_batch_size(data))):
                    if keep is not None and not keep(index):
                        results.append(None)
                        continue
                    results.append((self.loss_fn(self.model.forward(x), y, normalizer=1.0),
                                    int(np.count_nonzero(y != ignore))))
        finally:
            self.model.train()
        return results

    @staticmethod
    def language_model_metrics(data, per_batch: list) -> dict:
        """The "eval_<name>" metrics of `evaluation_losses`' results, added up in batch order."""
        summed, tokens = 0.0, 0
        for loss, count in per_batch:
            summed += loss
            tokens += count
        return {f"eval_{name}": value for name, value in data.metrics(summed, tokens).items()}
