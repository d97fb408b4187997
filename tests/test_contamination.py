import pytest

from warehouse import store
from warehouse.contamination import Contamination, ngram_overlap, snapshot_contamination
from warehouse.sources import SourceSpec

COPIED = ("the quick brown fox jumps over the lazy dog while the farmer sleeps under an old oak tree "
          "and dreams of rain falling softly on the fields")
UNRELATED = ("quantum chromodynamics describes strong interactions between quarks mediated by gluons "
             "inside protons neutrons and other hadrons observed at colliders")
CORPUS = [
    "Preface text. " + COPIED + " More corpus text follows here about nothing in particular.",
    "attention layers compute weighted sums of value vectors using softmax over query key scores",
]


def _words(text):
    return text.split()


def test_verbatim_copy_is_fully_contaminated_and_unrelated_is_clean():
    res = ngram_overlap({"test": [COPIED, UNRELATED]}, [CORPUS])
    r = res["test"]
    assert isinstance(r, Contamination)
    assert (r.split, r.n, r.n_examples) == ("test", 8, 2)
    assert r.examples == [(0, 1.0)]  # the unrelated text (overlap 0) is not listed
    assert r.contaminated == 1 and r.contaminated_frac == 0.5
    assert r.mean_overlap == 0.5
    alone = ngram_overlap({"u": [UNRELATED]}, [CORPUS])["u"]
    assert alone.mean_overlap == 0.0 and alone.contaminated == 0 and alone.examples == []


def test_half_copied_text_has_the_exact_share_of_its_ngrams():
    first = _words(COPIED)[:12]  # 12 words from the corpus
    new = "zebra yak xylophone walrus violin umbrella tulip saffron raven quince papaya orchid".split()
    text = " ".join(first + new)  # 24 words -> 17 8-grams, the first 5 lie wholly in the copied part
    r = ngram_overlap({"v": [text]}, [CORPUS], n=8)["v"]
    assert r.mean_overlap == pytest.approx(5 / 17)
    assert r.contaminated == 0  # 0.29 < 0.5
    assert ngram_overlap({"v": [text]}, [CORPUS], n=8, example_threshold=0.25)["v"].contaminated == 1
    # With n = 4: 21 4-grams, the first 9 lie wholly in the copied part.
    assert ngram_overlap({"v": [text]}, [CORPUS], n=4)["v"].mean_overlap == pytest.approx(9 / 21)


def test_case_and_punctuation_do_not_matter():
    shouted = COPIED.upper().replace(" ", ", ", 5).replace("fox", "fox!") + "."
    r = ngram_overlap({"t": [shouted]}, [[c.replace(" ", "\n  ") for c in CORPUS]])["t"]
    assert r.mean_overlap == 1.0 and r.contaminated == 1


def test_short_texts_are_one_ngram_of_all_their_words_and_empty_ones_are_skipped():
    texts = ["Lazy dog while", "dog lazy while", "", "  ... !!! ", "the quick brown fox jumps over the lazy dog"]
    r = ngram_overlap({"s": texts}, [CORPUS], n=8)["s"]
    # "lazy dog while" occurs in the corpus; "dog lazy while" does not; the two texts without words
    # are skipped (not scored, not counted); the 9-word text is fully in the corpus (2 8-grams).
    assert r.n_examples == 3
    assert r.examples == [(0, 1.0), (4, 1.0)]
    assert r.contaminated == 2
    assert r.mean_overlap == pytest.approx(2 / 3)


def test_several_splits_corpus_consumed_once_and_empty_inputs():
    def batches():
        yield CORPUS[:1]
        yield CORPUS[1:]

    res = ngram_overlap({"validation": [COPIED], "test": [UNRELATED, COPIED], "none": []}, batches())
    assert res["validation"].mean_overlap == 1.0
    assert res["test"].examples == [(1, 1.0)]
    assert res["none"] == Contamination("none", 8, 0, 0.0, 0, 0.0, [])
    assert ngram_overlap({"t": [COPIED]}, [])["t"].mean_overlap == 0.0
    with pytest.raises(ValueError):
        ngram_overlap({"t": [COPIED]}, [CORPUS], n=0)


def test_repeated_ngrams_count_each_time_they_occur():
    # 10 words: "alpha beta" x5 -> 9 bigrams, all in the corpus.
    r = ngram_overlap({"r": ["alpha beta " * 5]}, [["beta alpha beta"]], n=2)["r"]
    assert r.mean_overlap == 1.0
    r = ngram_overlap({"r": ["alpha beta " * 5 + "gamma"]}, [["alpha beta"]], n=2)["r"]
    assert r.mean_overlap == pytest.approx(5 / 10)  # 10 bigrams: 5 "alpha beta", 4 "beta alpha", 1 "beta gamma"


def test_only_the_top_20_are_listed():
    texts = [COPIED] * 25 + [UNRELATED]
    r = ngram_overlap({"t": texts}, [CORPUS])["t"]
    assert r.n_examples == 26 and r.contaminated == 25
    assert r.examples == [(i, 1.0) for i in range(20)]


def test_snapshot_variant_matches_the_pure_one(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = CORPUS + [f"document number {i} talks about tokenizers, corpora and the lazy dog while it sleeps"
                     for i in range(12)]
    for i, text in enumerate(docs):
        (folder / f"d{i}.txt").write_text(text)
    db = tmp_path / "w.duckdb"
    store.ingest(db, [SourceSpec(name="c", path=str(folder))])
    info = store.create_snapshot(db, "c", ["c"], 0.1, 0.1)
    assert info.n_documents == len(docs)

    half = " ".join(_words(COPIED)[:12]) + " zebra yak xylophone walrus violin umbrella tulip saffron raven"
    eval_texts = {"validation": [COPIED, UNRELATED, half], "test": ["Lazy dog while", UNRELATED]}
    got = snapshot_contamination(db, info.snapshot_id, eval_texts, batch=3)
    want = ngram_overlap(eval_texts, [docs])
    assert got == want
    assert got["validation"].examples[0] == (0, 1.0) and got["validation"].contaminated == 1
    assert got["test"].examples == [(0, 1.0)]

    with pytest.raises(store.WarehouseError, match="not in the warehouse"):
        snapshot_contamination(db, "nope", eval_texts)


def test_chunked_corpus_pass_gives_the_same_result(monkeypatch):
    import random

    from warehouse import contamination

    rng = random.Random(0)
    vocab = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    corpus = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 400))) for _ in range(40)]
    long_words = [rng.choice(vocab) for _ in range(5000)]
    corpus.append(", ".join(long_words))  # a long text, read in pieces when _PIECE_CHARS is small
    middle = max(corpus[:40], key=len).split()
    evals = {"random": [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 30))) for _ in range(200)],
             "copied": [" ".join(long_words[1800:1870]), " ".join(middle[-12:]), " ".join(long_words[-3:])]}
    for n in (1, 3, 5):
        whole = ngram_overlap(evals, [corpus], n=n)
        monkeypatch.setattr(contamination, "_CHUNK_WORDS", 7)
        monkeypatch.setattr(contamination, "_PIECE_CHARS", 50)
        chunked = ngram_overlap(evals, [corpus[:10], corpus[10:]], n=n)
        monkeypatch.undo()
        assert chunked == whole
        assert chunked["copied"].mean_overlap == 1.0
    assert 0 < whole["random"].mean_overlap < 1  # n = 5: some random 5-grams occur, most do not
