"""Checkpoints: crash-safe save and validated load of training state (safetensors + JSON, no pickle).

The package, by job:

    codec     the state tree <-> (its arrays by dotted path, a JSON description of the rest)
    tensors   the safetensors file: storable dtypes, and parsing it (and why npcpu parses it)
    durable   durable file writes: temporary name, fsync, rename, fsync the directory
    store     the run directory: checkpoint names, ``latest``, keeping the last k and the best
    load      loading a checkpoint with validation (SHA-256, markers, dtypes, shapes, finiteness),
              and the newest valid one of a run, naming each damaged one passed over
    export    a model's state dict as one safetensors file for torch

**Model weights are readable without npcpu.** The Trainer saves its model's state dict under the
key "model", so a checkpoint's tensors file holds the weights as ``model.0.weight``,
``model.0.bias``, ... with PyTorch's names, layouts and dtypes (bfloat16 stays bfloat16)::

    from safetensors.torch import load_file
    tensors = load_file("run/checkpoints/step-000300/tensors.safetensors")
    torch_model.load_state_dict({k[len("model."):]: v for k, v in tensors.items()
                                 if k.startswith("model.")})

`export_model` writes a state dict alone, without the prefix, for `load_file` directly.
"""

from npcpu.checkpoint.codec import FORMAT_VERSION, CheckpointError, flatten_state, unflatten_state
from npcpu.checkpoint.export import export_model
from npcpu.checkpoint.load import load_checkpoint, load_newest_valid
from npcpu.checkpoint.store import (CHECKPOINTS, FORMAT, LATEST, STATE_FILE, TENSORS_FILE,
                                    best_checkpoint, ensure_writable, list_checkpoints,
                                    save_checkpoint)
from npcpu.checkpoint.tensors import SAFETENSORS_DTYPES

__all__ = ["CHECKPOINTS", "FORMAT", "FORMAT_VERSION", "LATEST", "SAFETENSORS_DTYPES", "STATE_FILE",
           "TENSORS_FILE", "CheckpointError", "best_checkpoint", "ensure_writable", "export_model",
           "flatten_state", "list_checkpoints", "load_checkpoint", "load_newest_valid", "save_checkpoint",
           "unflatten_state"]
