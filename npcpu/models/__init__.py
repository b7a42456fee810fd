"""Whole models built from npcpu.nn layers."""

from npcpu.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
