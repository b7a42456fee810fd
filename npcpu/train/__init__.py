"""The training system: Trainer and its step runners, dynamic layer freezing, callbacks."""

from npcpu.train.callbacks import Callback, EarlyStopping
from npcpu.train.compiled import CompiledClassifierStep
from npcpu.train.freezing import DynamicFreezer
from npcpu.train.runner_compiled import CompiledRunner
from npcpu.train.runners import ReferenceRunner, StepResult, StepRunner
from npcpu.train.trainer import Trainer

__all__ = ["Callback", "CompiledClassifierStep", "CompiledRunner", "DynamicFreezer", "EarlyStopping",
           "ReferenceRunner", "StepResult", "StepRunner", "Trainer"]
