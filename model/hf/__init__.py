"""Export to the Hugging Face format: `config.json` + `model.safetensors` + tokenizer files.

Each objective says what it exports (`hf_exports(model, specials)` in its module): a mapping from
a sub-folder ("" for the main model) to a state dict in the stock class's names and that class's
config. The mappings live here, one module per Hugging Face family (bert, gpt2, electra, t5), and
tests/test_export*.py load every export with `transformers`' Auto classes and compare logits. No
`transformers` import is needed to write them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from model.config import ModelConfig

TOKENIZER_KEYS = {"pad": "pad_token", "unk": "unk_token", "cls": "cls_token", "sep": "sep_token", "mask": "mask_token"}


class ExportError(ValueError):
    pass


def weight_and_bias(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """`{name}.weight` and `{name}.bias` of a Linear or LayerNorm, under a Hugging Face name."""
    return {f"{name}.weight": module.weight, f"{name}.bias": module.bias}


def check_stock(cfg: ModelConfig, family: str, **expected) -> None:
    """Refuse a model that the stock class cannot express (e.g. a pre-LN BERT), naming the key."""
    for key, value in expected.items():
        if getattr(cfg, key) != value:
            raise ExportError(f"a {family} export needs model.{key}={value!r}, this model has {getattr(cfg, key)!r}")


def export_hf(model: nn.Module, objective: str, out_dir: str | Path, tokenizer_path: str | Path | None,
              specials: dict[str, int]) -> Path:
    from model.objectives import get_objective

    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for sub, (state, config) in get_objective(objective).hf_exports(model, specials).items():
        target = out / sub
        target.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}
        safetensors.torch.save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
        (target / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer_path is not None:
            write_tokenizer(target, tokenizer_path, specials, model.cfg)
    return out


def write_tokenizer(out: Path, tokenizer_path: str | Path, specials: dict[str, int], cfg: ModelConfig) -> None:
    shutil.copy(tokenizer_path, out / "tokenizer.json")
    tokens = json.loads(Path(tokenizer_path).read_text())["added_tokens"]
    by_id = {t["id"]: t["content"] for t in tokens}
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len}
    tok_cfg.update({TOKENIZER_KEYS[k]: by_id[v] for k, v in specials.items() if k in TOKENIZER_KEYS and v in by_id})
    if cfg.arch == "decoder" and "sep" in specials:
        tok_cfg["eos_token"] = tok_cfg["bos_token"] = by_id[specials["sep"]]
    if cfg.arch == "encoder-decoder" and "sep" in specials:
        tok_cfg["eos_token"] = by_id[specials["sep"]]
    if "sentinel" in specials and "sentinel_last" in specials:
        tok_cfg["additional_special_tokens"] = [by_id[i] for i in range(specials["sentinel"], specials["sentinel_last"] + 1)
                                                if i in by_id]
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
