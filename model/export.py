"""Export to the Hugging Face format: `config.json` + `model.safetensors` + tokenizer files.

The encoder is a BERT (BertForMaskedLM), the decoder a GPT-2 (GPT2LMHeadModel); both load with
`transformers`' Auto classes and give this project's logits (tests/test_export.py). No
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


class ExportError(ValueError):
    pass


def _check_stock(cfg: ModelConfig, arch: str, **expected) -> None:
    for key, value in expected.items():
        if getattr(cfg, key) != value:
            raise ExportError(f"a {arch} export needs model.{key}={value!r}, this model has {getattr(cfg, key)!r}")


def bert_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    cfg, bb, head = model.cfg, model.backbone, model.head
    _check_stock(cfg, "BERT", norm="post", activation="gelu", embed_norm=True)
    sd = {
        "bert.embeddings.word_embeddings.weight": bb.tok_emb.weight,
        "bert.embeddings.position_embeddings.weight": bb.pos_emb.weight,
        "bert.embeddings.token_type_embeddings.weight": bb.seg_emb.weight,
        "bert.embeddings.LayerNorm.weight": bb.emb_norm.weight,
        "bert.embeddings.LayerNorm.bias": bb.emb_norm.bias,
        "cls.predictions.transform.dense.weight": head.dense.weight,
        "cls.predictions.transform.dense.bias": head.dense.bias,
        "cls.predictions.transform.LayerNorm.weight": head.norm.weight,
        "cls.predictions.transform.LayerNorm.bias": head.norm.bias,
        "cls.predictions.bias": head.bias,
    }
    for i, blk in enumerate(bb.blocks):
        p = f"bert.encoder.layer.{i}."
        for name, w, b in zip(("query", "key", "value"), blk.attn.qkv.weight.chunk(3), blk.attn.qkv.bias.chunk(3)):
            sd[f"{p}attention.self.{name}.weight"], sd[f"{p}attention.self.{name}.bias"] = w, b
        sd.update({
            f"{p}attention.output.dense.weight": blk.attn.proj.weight,
            f"{p}attention.output.dense.bias": blk.attn.proj.bias,
            f"{p}attention.output.LayerNorm.weight": blk.ln_attn.weight,
            f"{p}attention.output.LayerNorm.bias": blk.ln_attn.bias,
            f"{p}intermediate.dense.weight": blk.mlp.fc.weight,
            f"{p}intermediate.dense.bias": blk.mlp.fc.bias,
            f"{p}output.dense.weight": blk.mlp.proj.weight,
            f"{p}output.dense.bias": blk.mlp.proj.bias,
            f"{p}output.LayerNorm.weight": blk.ln_mlp.weight,
            f"{p}output.LayerNorm.bias": blk.ln_mlp.bias,
        })
    return sd


def bert_config(cfg: ModelConfig, specials: dict[str, int]) -> dict:
    return {
        "architectures": ["BertForMaskedLM"], "model_type": "bert",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff, "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.n_segments,
        "layer_norm_eps": cfg.ln_eps, "pad_token_id": specials.get("pad", cfg.pad_id),
        "tie_word_embeddings": True,
    }


def gpt2_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    cfg, bb = model.cfg, model.backbone
    _check_stock(cfg, "GPT-2", norm="pre", activation="gelu_tanh", embed_norm=False, n_segments=0)
    sd = {
        "transformer.wte.weight": bb.tok_emb.weight,
        "transformer.wpe.weight": bb.pos_emb.weight,
        "transformer.ln_f.weight": bb.final_norm.weight,
        "transformer.ln_f.bias": bb.final_norm.bias,
    }
    for i, blk in enumerate(bb.blocks):
        p = f"transformer.h.{i}."
        # GPT-2 stores its projections as Conv1D, i.e. transposed nn.Linear weights.
        sd.update({
            f"{p}ln_1.weight": blk.ln_attn.weight, f"{p}ln_1.bias": blk.ln_attn.bias,
            f"{p}attn.c_attn.weight": blk.attn.qkv.weight.t(), f"{p}attn.c_attn.bias": blk.attn.qkv.bias,
            f"{p}attn.c_proj.weight": blk.attn.proj.weight.t(), f"{p}attn.c_proj.bias": blk.attn.proj.bias,
            f"{p}ln_2.weight": blk.ln_mlp.weight, f"{p}ln_2.bias": blk.ln_mlp.bias,
            f"{p}mlp.c_fc.weight": blk.mlp.fc.weight.t(), f"{p}mlp.c_fc.bias": blk.mlp.fc.bias,
            f"{p}mlp.c_proj.weight": blk.mlp.proj.weight.t(), f"{p}mlp.c_proj.bias": blk.mlp.proj.bias,
        })
    return sd


def gpt2_config(cfg: ModelConfig, specials: dict[str, int]) -> dict:
    eos = specials.get("sep", 0)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len, "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.ln_eps, "bos_token_id": eos, "eos_token_id": eos,
        "pad_token_id": specials.get("pad", cfg.pad_id), "tie_word_embeddings": True,
    }


EXPORTERS = {"encoder": (bert_state_dict, bert_config), "decoder": (gpt2_state_dict, gpt2_config)}


def export_hf(model: nn.Module, out_dir: str | Path, tokenizer_path: str | Path | None, specials: dict[str, int]) -> Path:
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    to_state, to_config = EXPORTERS[model.cfg.arch]
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in to_state(model).items()}
    safetensors.torch.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(to_config(model.cfg, specials), indent=2))
    if tokenizer_path is not None:
        shutil.copy(tokenizer_path, out / "tokenizer.json")
        names = {"pad": "pad_token", "unk": "unk_token", "cls": "cls_token", "sep": "sep_token", "mask": "mask_token"}
        tokens = json.loads(Path(tokenizer_path).read_text())["added_tokens"]
        by_id = {t["id"]: t["content"] for t in tokens}
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.cfg.max_seq_len}
        tok_cfg.update({names[k]: by_id[v] for k, v in specials.items() if k in names and v in by_id})
        if model.cfg.arch == "decoder" and "sep" in specials:
            tok_cfg["eos_token"] = tok_cfg["bos_token"] = by_id[specials["sep"]]
        (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return out
