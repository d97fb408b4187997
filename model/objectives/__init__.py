"""One module per pretraining objective: its example maker, its collator and its loss.

Each objective module exposes `ARCH`, `make_examples(tokens, offsets, seq_len, specials)`,
`build(cfg: ModelConfig)` (the model with its head) and the model's `forward(batch, generator)`
which returns `(loss, stats)`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from model.config import ConfigError

OBJECTIVES = {
    "mlm": "model.objectives.mlm",  # BERT masked LM, dynamic masking
    "clm": "model.objectives.clm",  # GPT autoregressive LM
}


def get_objective(name: str) -> ModuleType:
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; available objectives: {', '.join(OBJECTIVES)}")
    return importlib.import_module(OBJECTIVES[name])
