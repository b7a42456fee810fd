"""The training system: Trainer, dynamic layer freezing, callbacks."""

from npcpu.train.callbacks import Callback, EarlyStopping
from npcpu.train.compiled import CompiledClassifierStep
from npcpu.train.freezing import DynamicFreezer
from npcpu.train.trainer import Trainer

__all__ = ["Callback", "CompiledClassifierStep", "DynamicFreezer", "EarlyStopping", "Trainer"]
