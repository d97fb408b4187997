"""Tokenizer training with Hugging Face `tokenizers`, on the train split of a snapshot only."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from warehouse.store import WarehouseError, iter_texts

# Fixed ids 0..4, so every objective and every export agrees on them; T5's sentinels follow (5, 6, ...).
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
SENTINEL = "<extra_id_{}>"
KINDS = ("bpe", "wordpiece", "unigram")


@dataclass
class TokenizerConfig:
    kind: str = "bpe"  # byte-level BPE (GPT-2 / RoBERTa) | wordpiece (BERT) | unigram (T5)
    vocab_size: int = 8192
    min_frequency: int = 2
    sentinels: int = 32  # span-corruption sentinels <extra_id_0..N-1> (T5 needs one per masked span)


def _build(cfg: TokenizerConfig):
    specials = list(SPECIAL_TOKENS.values()) + [SENTINEL.format(i) for i in range(cfg.sentinels)]
    if cfg.kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                      special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    elif cfg.kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                            special_tokens=specials, show_progress=False)
    elif cfg.kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=cfg.vocab_size, special_tokens=specials, unk_token="[UNK]",
                                          show_progress=False)
    else:
        raise WarehouseError(f"tokenizer.kind={cfg.kind!r} is unknown; use one of {', '.join(KINDS)}")
    return tok, trainer


def train_tokenizer(db_path: str | Path, snapshot_id: str, cfg: TokenizerConfig, out_path: str | Path) -> dict:
    tok, trainer = _build(cfg)
    tok.train_from_iterator((t for batch in iter_texts(db_path, snapshot_id, "train") for t in batch), trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(out_path)
    return {"vocab_size": tok.get_vocab_size(), "specials": special_ids(tok)}


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """Ids of the special tokens; the sentinels as the range `sentinel` .. `sentinel_last`."""
    ids = {name: tok.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
    n = 0
    while tok.token_to_id(SENTINEL.format(n)) is not None:
        n += 1
    if n:
        ids["sentinel"], ids["sentinel_last"] = tok.token_to_id(SENTINEL.format(0)), tok.token_to_id(SENTINEL.format(n - 1))
    return ids
