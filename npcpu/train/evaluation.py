"""A trainer's evaluation: the mean loss and the loss's own metrics over a data set, on the
weights the optimizer evaluates (Lookahead's slow weights), in evaluation mode (no dropout).

`Evaluation` is the part of npcpu.train.trainer.Trainer that reads the model without training it;
it uses the trainer's `model`, `loss_fn`, `optimizer`, `step` and `last_eval`. A data-parallel
trainer (npcpu.dist) overrides `evaluate_batches` to evaluate its share of the batches.
"""

from __future__ import annotations

from npcpu.data.loader import DataLoader


class Evaluation:
    """evaluate(), and the pieces a trainer's loop and a data-parallel trainer build it from."""

    def evaluate(self, data, batch_size: int = 512) -> dict:
        """The metrics the loss defines for an evaluation, each as "eval_<name>": the mean loss
        over `data`, and what `loss_fn.evaluation_sums` / `evaluation_metrics` add (accuracy for
        CrossEntropyLoss, nothing for MSELoss; a language model's loss adds perplexity and
        tokens there). On the weights the optimizer evaluates (`optimizer.evaluation_weights()`:
        Lookahead's slow weights)."""
        loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size, shuffle=False)
        return self.evaluation_metrics(self.evaluate_batches(loader, 0, len(loader)),
                                       len(loader.dataset))

    def evaluate_batches(self, loader: DataLoader, first: int, stop: int) -> list:
        """[(loss / samples of the data set, loss_fn.evaluation_sums)] of batches first..stop-1
        of `loader`, on the weights the optimizer evaluates. A data-parallel trainer evaluates
        its share of the batches here and gathers the rest."""
        items = len(loader.dataset)
        results = []
        self.model.eval()
        try:
            with self.optimizer.evaluation_weights():
                batches = loader.iter_from(loader.epoch, first)
                try:
                    for _ in range(first, stop):
                        x, y = next(batches)
                        outputs = self.model.forward(x)
                        # the sums first: a loss may write its gradient over the outputs (in_place)
                        sums = self.loss_fn.evaluation_sums(outputs, y)
                        results.append((self.loss_fn(outputs, y, normalizer=items), sums))
                finally:
                    batches.close()
        finally:
            self.model.train()
        return results

    def evaluation_metrics(self, per_batch: list, items: int) -> dict:
        """The "eval_<name>" metrics from `evaluate_batches`' results of every batch, added up in
        batch order."""
        loss, sums = 0.0, {}
        for batch_loss, batch_sums in per_batch:
            loss += batch_loss
            for name, value in batch_sums.items():
                sums[name] = sums.get(name, 0) + value
        metrics = self.loss_fn.evaluation_metrics(loss, sums, items)
        return {f"eval_{name}": value for name, value in metrics.items()}

    def _evaluate_and_report(self, eval_data, batch_size, callbacks) -> None:
        self.last_eval = {"step": self.step, **self.evaluate(eval_data, max(batch_size, 512))}
        for cb in callbacks:
            cb.on_eval_end(self, self.last_eval)
