"""Quality filters: clean text and real docstrings pass, each kind of junk is caught by its filter,
reasons name the config key, and thresholds switch off one by one."""
import random

import pytest

from warehouse.quality import FILTERS, QualityConfig, check, failures, gopher, profile
from warehouse.sources import Reject, SourceSpec, normalize, read_source

PROSE = (
    "The committee met on Tuesday to review the budget for the coming year. Members agreed that the "
    "library needs new shelves, and that the reading room should stay open later during the winter. "
    "A small group will visit other towns to see how their libraries handle evening opening hours.\n\n"
    "The next meeting is planned for early March, when the group reports back with costs and a plan."
)
DOCSTRING = '''Return the number of items in the sequence that equal value.

The comparison uses ==, so 1 and 1.0 count as the same item.

>>> [1, 2, 2, 3].count(2)
2
>>> "banana".count("a")  # also works on strings
3'''


def rng_words(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return ["".join(r.choices("abcdefghijklmnopqrstuvwxyz", k=r.randint(3, 8))) for _ in range(n)]


def fired(text: str, cfg: QualityConfig | None = None) -> set[str]:
    return {reason.split()[1] for reason in failures(text, cfg or QualityConfig())}


JUNK = {
    "word_count": "hi there",
    "mean_word_length": "data: " + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo" * 20 + " end of blob here",
    "symbol_ratio": "great day " + " ".join(f"#tag{i}" for i in range(30)),
    "bullet_lines": "\n".join(f"- item number {i} in the list" for i in range(12)),
    "ellipsis_lines": "\n".join(f"Read more about story {w} and what happened..." for w in rng_words(6)),
    "alpha_words": "totals " + " ".join(f"{i * 37 % 1000} -- {i}%" for i in range(40)),
    "digit_ratio": "Call 0800123456 or 0800654321 or 0800111222 or 0800333444 today",
    "dup_lines": "\n".join(["Click here to subscribe", "Buy now and save", "Click here to subscribe",
                            "Buy now and save", "Click here to subscribe", "best offer in town"]),
    "dup_paragraphs": "\n\n".join([PROSE.split("\n\n")[0], "Short note between copies."] * 2),
    "top_2gram": " ".join(w for a in rng_words(60, 1) for w in (a, "buy cheap")),
    "boilerplate_lines": "Home | News | Contact\n© 2021 Example Ltd. All rights reserved.\n"
                         "Privacy Policy | Terms of Use\nThis site uses cookies to improve your experience.",
}


def test_clean_prose_and_docstrings_pass():
    assert check(PROSE, QualityConfig()) is None
    assert check(DOCSTRING, QualityConfig()) is None


@pytest.mark.parametrize("name", sorted(JUNK))
def test_each_kind_of_junk_is_caught_by_its_filter(name):
    assert name in fired(JUNK[name]), failures(JUNK[name], QualityConfig())
    assert check(JUNK[name], QualityConfig()) is not None


def test_lorem_ipsum_and_web_footer_are_rejected_as_boilerplate():
    lorem = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt."
    assert "boilerplate_lines" in fired(lorem)
    # one-line docstrings mentioning the words are not boilerplate
    assert check("Return a string suitable for JavaScript.", QualityConfig()) is None
    assert check("Set a cookie on the response if the policy allows it.", QualityConfig()) is None


def test_reason_names_filter_value_and_config_key_and_counts_as_quality():
    reason = check(JUNK["symbol_ratio"], QualityConfig())
    assert reason.startswith("quality: symbol_ratio ")
    assert reason.endswith("> 0.20 (corpus.quality.max_symbol_ratio)")
    # the category rule the ingest report uses
    assert reason.split(":")[0].split(" (")[0] == "quality"
    assert check("hi there", QualityConfig()) == "quality: word_count 2 < 3 (corpus.quality.min_words)"
    assert all(r.split()[1] in FILTERS for r in failures("hi", QualityConfig()))


def test_null_switches_one_filter_off_and_enabled_false_all():
    text = JUNK["symbol_ratio"]
    assert "symbol_ratio" not in fired(text, QualityConfig(max_symbol_ratio=None))
    off = QualityConfig(enabled=False)
    assert all(check(t, off) is None for t in JUNK.values())
    assert check("", off) is None


def test_thresholds_from_the_command_line_arrive_as_strings():
    cfg = QualityConfig(max_symbol_ratio="1.5", max_dup_lines="null", min_words="off")
    assert cfg.max_symbol_ratio == 1.5 and cfg.max_dup_lines is None and cfg.min_words is None
    assert "symbol_ratio" not in fired(JUNK["symbol_ratio"], cfg)
    with pytest.raises(ValueError, match=r"corpus\.quality\.max_digit_ratio expects a number"):
        QualityConfig(max_digit_ratio="lots")
    with pytest.raises(ValueError, match=r"corpus\.quality\.min_words"):
        QualityConfig(min_words=-1)


def test_threshold_is_a_bound_not_a_switch():
    text = JUNK["dup_lines"]  # 3 of 6 lines repeat an earlier one: 0.5
    assert "dup_lines" in fired(text, QualityConfig(max_dup_lines=0.49))
    assert "dup_lines" not in fired(text, QualityConfig(max_dup_lines=0.5))


def test_ngram_filters_skip_short_texts_unless_asked():
    short = ("Separate the underlying buffer from the TextIOBase and return it. After the underlying "
             "buffer has been detached, the TextIO is in an unusable state.")
    assert check(short, QualityConfig()) is None
    assert {"top_2gram", "top_3gram"} & fired(short, QualityConfig(ngram_min_words=0))


def test_gopher_values_are_stricter_than_the_defaults():
    assert check(DOCSTRING, gopher()) is not None  # 30 words < 50
    assert check(PROSE, gopher()) is None


def test_odd_texts_never_raise():
    odd = ["", " \n\t ", "\n\n\n", "\x00\x01", "a", "…" * 500, "#" * 1000, "x" * 100_000,
           "中文没有空格所以整段是一个词" * 20, "\u200b" * 50, "....\n....\n", "- \n* \n• "]
    for text in odd:
        reason = check(text, QualityConfig())
        assert reason is None or reason.startswith("quality: ")
    assert check("", QualityConfig()).startswith("quality: word_count 0 < 3")


def test_profile_counts_each_filter_and_the_total():
    texts = [PROSE, DOCSTRING, JUNK["bullet_lines"], JUNK["bullet_lines"], JUNK["alpha_words"], JUNK["word_count"]]
    p = profile(texts, QualityConfig())
    assert list(p)[:len(FILTERS)] == list(FILTERS)
    assert p["bullet_lines"] == 2 and p["word_count"] == 1 and p["alpha_words"] == 1
    assert p["total"] == 4 and p["docs"] == 6
    assert sum(p[f] for f in FILTERS) >= p["total"]
    assert profile([], QualityConfig()) == {**dict.fromkeys(FILTERS, 0), "total": 0, "docs": 0}


def test_on_files_read_like_the_ingest_reads_them(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "good.txt").write_text(PROSE)
    (folder / "spam.md").write_text(JUNK["symbol_ratio"])
    (folder / "broken.txt").write_bytes(b"\xff\xfe\x00 not utf-8 \xc3")
    items = list(read_source(SourceSpec(name="c", path=str(folder))))
    rejects = [i for i in items if isinstance(i, Reject)]
    verdicts = {d.path.rsplit("/", 1)[-1]: check(normalize(d.text), QualityConfig())
                for d in items if not isinstance(d, Reject)}
    assert verdicts["good.txt"] is None
    assert verdicts["spam.md"].startswith("quality: symbol_ratio")
    assert [r.path.rsplit("/", 1)[-1] for r in rejects] == ["broken.txt"]


@pytest.mark.slow
def test_builtin_corpus_loses_under_five_percent():
    from warehouse.builtin import python_docs

    texts = [normalize(d.text) for d in python_docs("python-docs")]
    p = profile(texts, QualityConfig())
    assert p["docs"] > 1000
    assert p["total"] / p["docs"] < 0.05, p
    assert profile(texts, gopher())["total"] / p["docs"] > 0.5  # Gopher's min_words alone drops most
