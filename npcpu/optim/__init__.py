"""Optimizers, learning-rate schedules and schedulers, loss scaling and gradient clipping."""

from npcpu.optim import schedules
from npcpu.optim.adam import Adam, AdamW
from npcpu.optim.clip import clip_grad_norm, clip_grad_value, get_total_norm
from npcpu.optim.lamb import LAMB
from npcpu.optim.lookahead import Lookahead
from npcpu.optim.lr_scheduler import (CosineAnnealingLR, ExponentialLR, LambdaLR, LinearLR,
                                      OneCycleLR, SequentialLR, StepLR)
from npcpu.optim.optimizer import Optimizer
from npcpu.optim.scaling import DynamicLossScaler
from npcpu.optim.sgd import SGD

__all__ = [
    "LAMB", "SGD", "Adam", "AdamW", "CosineAnnealingLR", "DynamicLossScaler", "ExponentialLR",
    "LambdaLR", "LinearLR", "Lookahead", "OneCycleLR", "Optimizer", "SequentialLR", "StepLR",
    "clip_grad_norm", "clip_grad_value", "get_total_norm", "schedules",
]
