"""The layer engine: Parameter, Module, Sequential, layers and losses (no autograd)."""

from npcpu.nn.activations import GELU, ReLU, Tanh
from npcpu.nn.attention import CausalSelfAttention, KVCache
from npcpu.nn.dropout import Dropout
from npcpu.nn.embedding import Embedding
from npcpu.nn.flatten import Flatten
from npcpu.nn.linear import FusedLinearReLU, Linear
from npcpu.nn.losses import CrossEntropyLoss, Loss, MSELoss
from npcpu.nn.module import Module, Sequential
from npcpu.nn.norm import LayerNorm
from npcpu.nn.parameter import Parameter
from npcpu.nn.transformer import MLP, Block

__all__ = [
    "Block", "CausalSelfAttention", "CrossEntropyLoss", "Dropout", "Embedding", "Flatten",
    "FusedLinearReLU", "GELU", "KVCache", "LayerNorm", "Linear", "Loss", "MLP", "MSELoss", "Module",
    "Parameter", "ReLU", "Sequential", "Tanh",
]
