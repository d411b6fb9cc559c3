"""The training runtime: one fine-tuning step (full, LoRA, QLoRA), term by term.

profile.py    training.yaml: per-family layer facts, CUDA op facts, bitsandbytes and peft constants
saved.py      the tensors autograd saves, walked op by op through a family's layer
params.py     what trains: all weights or LoRA adapters; gradients; optimizer states and temporaries
steps.py      the two steps as moments (explicit lists of alive tensors) and the allocator replay
estimate.py   Architecture + Training -> `TrainingEstimate`

Each function is pure: typed inputs, integer bytes out, no I/O beyond package data.
"""

from __future__ import annotations

from .estimate import estimate_training

__all__ = ["estimate_training"]
