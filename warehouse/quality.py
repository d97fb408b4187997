"""Document quality filters: cheap per-document heuristics that drop junk before training.

In the spirit of C4 (Raffel et al. 2020) and Gopher's MassiveText filters (Rae et al. 2021):
length, mean word length, symbol-to-word ratio, bullet and ellipsis lines, words without a
letter, digits, repeated lines / paragraphs, the share of the text covered by its most frequent
word n-gram, and web boilerplate lines ("privacy policy", "enable javascript", "lorem ipsum").

Gopher's thresholds were tuned on web pages. The built-in corpus (Python docstrings and pydoc
topics) is short, code-laden text: a median docstring has 20 words, doctests put `...` and `#` on
many lines, and tables of codes are mostly digits. The defaults below therefore keep Gopher's
values where they cost that corpus little and relax the rest; `gopher()` gives the strict values.
Each threshold is one key of `corpus.quality`; `null` switches that filter off, and
`enabled: false` switches them all off. Reasons read
"quality: symbol_ratio 0.23 > 0.10 (corpus.quality.max_symbol_ratio)" so the reject report says
which filter fired and which key to change. Words are split on whitespace: for Chinese or Japanese
text set the word-based keys (min_words, the mean word length, the n-gram keys) to null.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Iterable

# C4's line-level rules (it drops lines containing these and whole pages with "lorem ipsum"), as
# phrases: bare "cookie" or "javascript" would hit one-line docstrings of http.cookies.
BOILERPLATE_PHRASES = [
    "lorem ipsum", "enable javascript", "javascript is disabled", "javascript is required", "requires javascript",
    "terms of use", "terms of service", "privacy policy", "cookie policy",
    "uses cookies", "use of cookies", "use cookies", "accept cookies", "all rights reserved",
]
BULLETS = ("•", "●", "◦", "▪", "‣", "∙", "·", "-", "*", "–", "—")  # not ">": doctest prompts


@dataclass
class QualityConfig:
    """Thresholds of the filters, one per key of `corpus.quality`; None switches a filter off."""
    enabled: bool = True
    min_words: int | None = 3  # Gopher 50; docstrings are short ("Return the current file position.")
    max_words: int | None = 100_000  # Gopher 100,000
    min_mean_word_length: float | None = 3.0  # Gopher 3
    max_mean_word_length: float | None = 15.0  # Gopher 10; doctests (Decimal('1.3')) and dotted names run long
    max_symbol_ratio: float | None = 0.2  # Gopher 0.1 ('#' and '...' per word); doctests and comments
    max_bullet_lines: float | None = 0.9  # Gopher 0.9 (fraction of lines starting with a bullet)
    max_ellipsis_lines: float | None = 0.3  # Gopher 0.3 (fraction of lines ending with '...')
    min_alpha_words: float | None = 0.5  # Gopher 0.8 (words with a letter); doctests and signatures have fewer
    max_digit_ratio: float | None = 0.3  # fraction of non-space characters that are digits (not Gopher)
    max_dup_lines: float | None = 0.3  # Gopher 0.3 (fraction of non-blank lines repeating an earlier one)
    max_dup_paragraphs: float | None = 0.3  # Gopher 0.3 (same for blank-line separated paragraphs)
    max_top_2gram: float | None = 0.2  # Gopher 0.20 (characters covered by the most frequent 2-gram)
    max_top_3gram: float | None = 0.18  # Gopher 0.18
    max_top_4gram: float | None = 0.16  # Gopher 0.16
    # The n-gram filters measure only texts of at least this many words: in a 20-word docstring one
    # phrase said twice ("the underlying buffer") covers 30%. Gopher never sees texts under 50 words.
    ngram_min_words: int = 50
    max_boilerplate_lines: float | None = 0.3  # fraction of non-blank lines with a boilerplate phrase
    boilerplate_phrases: list[str] = field(default_factory=lambda: list(BOILERPLATE_PHRASES))

    def __post_init__(self) -> None:
        # The config loader passes `float | None` values through as given, so
        # `--set corpus.quality.max_symbol_ratio=0.2` arrives as a string; "null" / "off" switch off.
        for f in fields(self):
            if f.name in ("enabled", "boilerplate_phrases", "ngram_min_words"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, str):
                if value.strip().lower() in ("", "none", "null", "off"):
                    value = None
                else:
                    try:
                        value = float(value)
                    except ValueError:
                        raise ValueError(f"corpus.quality.{f.name} expects a number or null, got {value!r}") from None
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"corpus.quality.{f.name} expects a number >= 0 or null, got {value!r}")
            setattr(self, f.name, value)
        self.boilerplate_phrases = [p.lower() for p in self.boilerplate_phrases]


# filter name -> (statistic, config key, True when the key is a lower bound), in the order checked
_RULES = [
    ("word_count", "min_words", True), ("word_count", "max_words", False),
    ("mean_word_length", "min_mean_word_length", True), ("mean_word_length", "max_mean_word_length", False),
    ("symbol_ratio", "max_symbol_ratio", False),
    ("bullet_lines", "max_bullet_lines", False),
    ("ellipsis_lines", "max_ellipsis_lines", False),
    ("alpha_words", "min_alpha_words", True),
    ("digit_ratio", "max_digit_ratio", False),
    ("boilerplate_lines", "max_boilerplate_lines", False),
    ("dup_lines", "max_dup_lines", False),
    ("dup_paragraphs", "max_dup_paragraphs", False),
    ("top_2gram", "max_top_2gram", False), ("top_3gram", "max_top_3gram", False),
    ("top_4gram", "max_top_4gram", False),
]
FILTERS: tuple[str, ...] = tuple(dict.fromkeys(name for name, _, _ in _RULES))

_NO_LETTER_WORD = re.compile(r"(?<!\S)(?:[^\s\w]|[\d_])+(?!\S)")  # a word with no letter in it
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def _dup_fraction(items: list[str]) -> float:
    return 1.0 - len(set(items)) / len(items) if items else 0.0


def _top_ngram(words: list[str], n: int, n_chars: int, min_words: int) -> float:
    """Fraction of word characters covered by the most frequent n-gram (Gopher counts it only if it repeats)."""
    if len(words) < max(n + 1, min_words) or not n_chars:
        return 0.0
    gram, count = Counter(zip(*(words[i:] for i in range(n)))).most_common(1)[0]
    return sum(map(len, gram)) * count / n_chars if count > 1 else 0.0


def stats(text: str, cfg: QualityConfig | None = None, need: set[str] | None = None) -> dict[str, float]:
    """Every statistic the filters compare (or only those in `need`), in one pass over the text."""
    cfg = cfg or QualityConfig()
    want = (lambda name: True) if need is None else need.__contains__
    words = text.split()
    n_words = len(words)
    n_chars = sum(map(len, words))  # non-space characters
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line] or [""]
    out: dict[str, float] = {"word_count": n_words}
    if want("mean_word_length"):
        out["mean_word_length"] = n_chars / n_words if n_words else 0.0
    if want("symbol_ratio"):
        n_symbols = text.count("#") + text.count("...") + text.count("…")
        out["symbol_ratio"] = n_symbols / max(n_words, 1)
    if want("bullet_lines"):
        out["bullet_lines"] = sum(line.startswith(BULLETS) for line in lines) / len(lines)
    if want("ellipsis_lines"):
        out["ellipsis_lines"] = sum(line.endswith(("...", "…")) for line in lines) / len(lines)
    if want("alpha_words"):
        out["alpha_words"] = 1.0 - len(_NO_LETTER_WORD.findall(text)) / n_words if n_words else 0.0
    if want("digit_ratio"):
        out["digit_ratio"] = sum(map(text.count, "0123456789")) / n_chars if n_chars else 0.0
    if want("boilerplate_lines"):
        lower = [line.lower() for line in lines]
        out["boilerplate_lines"] = sum(any(p in line for p in cfg.boilerplate_phrases) for line in lower) / len(lines)
    if want("dup_lines"):
        out["dup_lines"] = _dup_fraction(lines)
    if want("dup_paragraphs"):
        out["dup_paragraphs"] = _dup_fraction([p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()])
    for n in (2, 3, 4):
        if want(f"top_{n}gram"):
            out[f"top_{n}gram"] = _top_ngram(words, n, n_chars, cfg.ngram_min_words)
    return out


def _fails(value: float, limit: float, lower: bool) -> bool:
    return value < limit if lower else value > limit


def _reason(name: str, key: str, lower: bool, value: float, limit: float) -> str:
    fmt = (lambda v: f"{v:g}") if name == "word_count" else (lambda v: f"{v:.2f}")
    return f"quality: {name} {fmt(value)} {'<' if lower else '>'} {fmt(limit)} (corpus.quality.{key})"


def _active(cfg: QualityConfig) -> list[tuple[str, str, bool, float]]:
    if not cfg.enabled:
        return []
    return [(name, key, lower, getattr(cfg, key)) for name, key, lower in _RULES if getattr(cfg, key) is not None]


def failures(text: str, cfg: QualityConfig) -> list[str]:
    """Every filter that rejects `text`, as reasons (empty when it passes)."""
    rules = _active(cfg)
    if not rules:
        return []
    s = stats(text, cfg, {name for name, *_ in rules})
    return [_reason(name, key, lower, s[name], limit) for name, key, lower, limit in rules
            if _fails(s[name], limit, lower)]


def check(text: str, cfg: QualityConfig) -> str | None:
    """None when `text` passes every enabled filter, else the reason of the first that rejects it."""
    found = failures(text, cfg)
    return found[0] if found else None


def profile(texts: Iterable[str], cfg: QualityConfig) -> dict[str, int]:
    """How many texts each filter would reject (a text failing several counts under each), in
    FILTERS order, plus "total": texts rejected by at least one filter, and "docs": texts seen."""
    counts = dict.fromkeys(FILTERS, 0)
    total = docs = 0
    for text in texts:
        docs += 1
        fired = {reason.split()[1] for reason in failures(text, cfg)}
        for name in fired:
            counts[name] += 1
        total += bool(fired)
    return {**counts, "total": total, "docs": docs}


def gopher() -> QualityConfig:
    """Gopher's thresholds for web text (Rae et al. 2021, appendix A), for comparison or strict use;
    digit_ratio and boilerplate_lines are not Gopher's and keep the defaults."""
    return QualityConfig(min_words=50, max_words=100_000, min_mean_word_length=3.0, max_mean_word_length=10.0,
                         max_symbol_ratio=0.1, max_bullet_lines=0.9, max_ellipsis_lines=0.3, min_alpha_words=0.8,
                         max_dup_lines=0.3, max_dup_paragraphs=0.3, max_top_2gram=0.2, max_top_3gram=0.18,
                         max_top_4gram=0.16, ngram_min_words=0)  # 0: measured alone; min_words=50 covers it
