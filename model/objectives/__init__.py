"""One module per pretraining objective: its example maker, its collator and its loss.

Each objective module exposes `ARCH` (encoder / decoder), `make_examples(tokens, offsets, seq_len,
specials)` (the example maker), `build(model_cfg, train_cfg, specials)` (the model with its head),
whose `forward(rows, generator)` applies the objective's corruption (the collator's job, per
batch) and returns `(loss, stats)`, and whose `logits(...)` serves evaluation and export.
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
