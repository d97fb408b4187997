"""One module per pretraining objective: its example maker, its collator and its loss.

Each objective module exposes
- `ARCH`: encoder | decoder | encoder-decoder (the model family it trains),
- `make_examples(tokens, offsets, cfg, specials, word_starts)`: the example maker, from a split's
  token stream (documents delimited by `offsets`) to fixed-width rows (a 2-D integer array),
- `build(model_cfg, train_cfg, specials)`: the model with its head, whose
  `forward(rows, generator)` applies the objective's corruption to a batch of rows (the
  collator's job: dynamic masks are drawn here) and returns `(loss, stats)`, whose `backbone`
  is the encoder a downstream task fine-tunes, and whose `flops_per_token(seq_len)` counts a
  training step's FLOPs per input token.

Several names select the same module with different settings (`PRESETS`): `mlm-wwm` is `mlm`
with `whole_word: true`. A setting given explicitly in `train:` still wins over the preset.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from model.config import ConfigError

OBJECTIVES = {
    "mlm": "model.objectives.mlm",
    "mlm-static": "model.objectives.mlm",
    "mlm-wwm": "model.objectives.mlm",
    "nsp": "model.objectives.nsp",
    "sop": "model.objectives.nsp",
    "clm": "model.objectives.clm",
    "prefix-lm": "model.objectives.prefix_lm",
    "electra": "model.objectives.electra",
    "t5": "model.objectives.t5",
}

DESCRIPTIONS = {
    "mlm": "masked LM, new masks every batch (RoBERTa's dynamic masking)",
    "mlm-static": "masked LM, masks fixed when examples are made, K copies (BERT)",
    "mlm-wwm": "masked LM selecting whole words",
    "nsp": "masked LM + next sentence prediction (BERT)",
    "sop": "masked LM + sentence order prediction (ALBERT)",
    "clm": "autoregressive LM over packed documents (GPT)",
    "prefix-lm": "bidirectional prefix, autoregressive rest (UniLM / T5 prefix LM)",
    "electra": "replaced token detection with a small MLM generator (ELECTRA)",
    "t5": "span corruption with sentinels, encoder-decoder (T5)",
}

PRESETS: dict[str, dict[str, Any]] = {
    "mlm-static": {"static_masking": True},
    "mlm-wwm": {"whole_word": True},
    "electra": {"mask_token_ratio": 1.0, "random_token_ratio": 0.0},  # the generator sees [MASK] only
}

# The TrainConfig keys an example maker reads: what the examples' cache depends on.
EXAMPLE_KEYS = ("objective", "seq_len", "seed", "mask_prob", "mask_token_ratio", "random_token_ratio",
                "whole_word", "static_masking", "static_copies", "noise_density", "mean_span")


def get_objective(name: str) -> ModuleType:
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; available objectives: {', '.join(OBJECTIVES)}")
    return importlib.import_module(OBJECTIVES[name])


def preset(name: str, explicit: dict[str, Any] | None = None) -> dict[str, Any]:
    """The objective's settings, under the ones the user set explicitly."""
    get_objective(name)
    return {**PRESETS.get(name, {}), **(explicit or {})}
