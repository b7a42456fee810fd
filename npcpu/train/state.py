"""What a checkpoint holds of a Trainer, and loading it back (Trainer.state_dict / load_state_dict)."""

from __future__ import annotations


def trainer_state(trainer) -> dict:
    """Everything needed to continue `trainer` bit-exactly: model, optimizer, schedule, scaler,
    freezer, the callbacks that have a state, counters."""
    return {
        "model": dict(trainer.model.state_dict(remove_duplicate=True)),  # a tied weight once
        "model_extra": {name: m.extra_state() for name, m in trainer.model.named_modules()
                        if m.extra_state()},
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "loss_scaler": trainer.loss_scaler.state_dict() if trainer.loss_scaler is not None else None,
        "freezer": trainer.freezer.state_dict() if trainer.freezer is not None else None,
        "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None
                      for cb in trainer.callbacks],
        "trainer": {"step": trainer.step, "epoch": trainer.epoch, "batch_index": trainer.batch_index,
                    "skipped_steps": trainer.skipped_steps, "samples_seen": trainer.samples_seen,
                    "seed": trainer.seed, "accumulation_steps": trainer.accumulation_steps,
                    "precision": trainer.precision, "last_eval": trainer.last_eval},
    }


def load_trainer_state(trainer, state: dict) -> None:
    """Load a `trainer_state` into `trainer`: ValueError when it was made with another seed,
    accumulation or precision, or with(out) a scheduler, loss scaler or freezer."""
    counters = state["trainer"]
    for key in ("seed", "accumulation_steps", "precision"):
        if counters[key] != getattr(trainer, key):
            raise ValueError(f"Trainer: the checkpoint was made with {key}={counters[key]!r}, "
                             f"this trainer has {key}={getattr(trainer, key)!r}")
    for part, obj in (("scheduler", trainer.scheduler), ("loss_scaler", trainer.loss_scaler),
                      ("freezer", trainer.freezer)):
        if (state[part] is None) != (obj is None):
            raise ValueError(f"Trainer: the checkpoint {'has' if state[part] is not None else 'has no'}"
                             f" {part} state but this trainer {'has no' if obj is None else 'has a'} {part}")
    trainer.model.load_state_dict(state["model"])
    modules = dict(trainer.model.named_modules())
    for name, extra in state["model_extra"].items():
        modules[name].load_extra_state(extra)
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.scheduler is not None:
        trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.loss_scaler is not None:
        trainer.loss_scaler.load_state_dict(state["loss_scaler"])
    if trainer.freezer is not None:
        trainer.freezer.load_state_dict(state["freezer"])
        trainer.freezer.apply(trainer.model)
    for cb, cb_state in zip(trainer.callbacks, state["callbacks"]):
        if cb_state is not None:
            cb.load_state_dict(cb_state)
    trainer.step, trainer.epoch = int(counters["step"]), int(counters["epoch"])
    trainer.batch_index = int(counters["batch_index"])
    trainer.skipped_steps = int(counters["skipped_steps"])
    trainer.samples_seen = int(counters["samples_seen"])
    trainer.last_eval = counters["last_eval"]
