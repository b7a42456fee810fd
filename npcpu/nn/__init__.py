"""The layer engine: Parameter, Module, Sequential, layers and losses (no autograd)."""

from npcpu.nn.module import Module, Sequential
from npcpu.nn.parameter import Parameter

__all__ = ["Module", "Parameter", "Sequential"]
