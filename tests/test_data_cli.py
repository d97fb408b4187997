"""`pretrain data ...` on a real DuckDB warehouse: every number the commands print is checked
against a direct SQL count or the files on disk."""
import json
import re
import shutil

import duckdb
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import write_corpus
from warehouse import catalog

N_GOOD = 30  # write_corpus: 10 .txt, 10 .md, and 10 lines of one .jsonl


def invoke(*args: str):
    # A wide terminal, so that tables do not cut ids or paths.
    return CliRunner().invoke(app, ["data", *args], env={"COLUMNS": "200"})


def ok(*args: str):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.stdout


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def wh(tmp_path_factory):
    """A workspace with one declared and ingested source: good files, a duplicate, an empty file, a
    binary file, and Greek and Cyrillic texts."""
    root = tmp_path_factory.mktemp("data_cli")
    corpus = write_corpus(root / "corpus", N_GOOD)
    (corpus / "greek.txt").write_text("Η γλώσσα είναι ένα σύστημα επικοινωνίας με λέξεις και κανόνες. " * 3)
    (corpus / "russian.md").write_text("Язык есть система знаков, служащая средством общения людей. " * 3)
    shutil.copy(corpus / "doc0.txt", corpus / "copy_of_doc0.txt")  # a second input, the same document
    (corpus / "empty.txt").write_text("  \n")
    (corpus / "binary.txt").write_bytes(b"\x00\x01\x02 not text \xff")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRETRAIN_HOME", str(root / "home"))
        added = ok("add", "main", str(corpus))
        first = ok("ingest", "main")
        sid = re.search(r"snapshot (\w{16})", first).group(1)
        yield {"root": root, "corpus": corpus, "db": root / "home" / "warehouse.duckdb", "sid": sid,
               "added": added, "first": first}


def sql(wh, query: str, *params):
    with duckdb.connect(str(wh["db"]), read_only=True) as con:
        return con.execute(query, list(params)).fetchall()


def test_add_ingest_and_unchanged_reingest(wh):
    assert "added source main" in wh["added"]
    assert re.search(r"│\s+35 │\s+32 │\s+32 │\s+2 │", wh["first"]), wh["first"]  # inputs, documents, new, rejects
    assert "binary content" in wh["first"] and "empty after cleaning" in wh["first"]
    again = ok("ingest")  # all declared sources: the same one
    assert "no new documents" in again
    assert f"snapshot {wh['sid']}" in again and "unchanged" in again
    assert sql(wh, "SELECT count(*) FROM snapshots") == [(1,)]

    changed = ok("add", "main", str(wh["corpus"]), "--text-field", "body")
    assert "replaced source main" in changed and "text_field text -> body" in changed
    assert "replaced source main" in ok("add", "main", str(wh["corpus"]))
    assert "already declared" in ok("add", "main", str(wh["corpus"]))
    assert json.loads(sql(wh, "SELECT spec FROM sources WHERE name = 'main'")[0][0])["text_field"] == "text"

    one_line_error(invoke("add", "other", str(wh["root"] / "nope")), "does not exist")
    one_line_error(invoke("add", "other", str(wh["corpus"]), "--format", "docx"), "unknown --format 'docx'", "auto")
    one_line_error(invoke("ingest", "other"), "not declared", "pretrain data add other")


def test_report_accounts_for_every_input(wh):
    [acc] = catalog.source_report(wh["db"], "main", examples=5)
    inputs_on_disk = N_GOOD + 2 + 1 + 2  # + greek, russian, the copy, empty, binary (10 of N_GOOD are .jsonl lines)
    assert acc.inputs == inputs_on_disk == acc.accepted + acc.rejected
    assert acc.accepted == sql(wh, "SELECT count(*) FROM provenance WHERE source = 'main'")[0][0] == 33
    assert acc.documents == acc.accepted - 1  # the copy is a second input of one document
    assert acc.reasons == {"binary content": 1, "empty after cleaning": 1}
    assert acc.examples["binary content"] == [str(wh["corpus"] / "binary.txt")]
    out = ok("report", "--rejects", "1")
    assert re.search(r"main\s+│\s+35 │\s+33 │\s+2 │\s+32 │", out), out
    assert str(wh["corpus"] / "empty.txt") in out
    one_line_error(invoke("report", "--source", "nosuch"), "no inputs of source 'nosuch'")


def test_snapshots_listing(wh):
    [snap] = json.loads(ok("snapshots", "--json"))
    assert snap["snapshot_id"] == wh["sid"] and snap["sources"] == ["main"]
    assert snap["n_documents"] == sql(wh, "SELECT count(*) FROM snapshot_documents WHERE snapshot_id = ?", wh["sid"])[0][0]
    assert wh["sid"] in ok("snapshots")


def test_stats_equal_direct_sql(wh, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = [r[0] for r in sql(wh, """SELECT d.text FROM snapshot_documents s JOIN documents d USING (doc_id)
                                       WHERE s.snapshot_id = ?""", wh["sid"])]
    splits = dict(sql(wh, "SELECT split, count(*) FROM snapshot_documents WHERE snapshot_id = ? GROUP BY split", wh["sid"]))
    st = catalog.snapshot_stats(wh["db"], wh["sid"][:6])
    assert st.documents == len(texts) == 32
    assert st.chars == sum(len(t) for t in texts)
    assert st.words == sum(len(t.split()) for t in texts)
    assert {k: v for k, v in st.splits.items() if v} == splits
    assert st.sources == {"main": 32}
    assert sum(b.count for b in st.histogram) == 32
    assert all(b.high == 2 * b.low for b in st.histogram)
    assert st.scripts["Greek"] > 0 and st.scripts["Cyrillic"] > 0 and st.scripts["Latin"] > 0.8
    assert st.scripts["CJK"] == st.scripts["Arabic"] == 0

    # A word-level tokenizer gives one token per whitespace word: the exact count is checkable.
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tok.json"))
    exact = catalog.snapshot_stats(wh["db"], wh["sid"], tokenizer=tmp_path / "tok.json", token_sample=0).tokens
    assert exact.exact and exact.tokens == st.words
    guess = catalog.snapshot_stats(wh["db"], wh["sid"], tokenizer=tmp_path / "tok.json", token_sample=8).tokens
    assert not guess.exact and guess.sample_documents == 8 and 0.5 * st.words < guess.tokens < 2 * st.words

    out = ok("stats", wh["sid"], "--tokenizer", str(tmp_path / "tok.json"), "--token-sample", "0",
             "--plot", str(tmp_path / "len.png"))
    assert f"{st.chars:,}" in out and f"{st.words:,}" in out and "exact" in out
    assert (tmp_path / "len.png").read_bytes()[:4] == b"\x89PNG"
    one_line_error(invoke("stats", wh["sid"], "--tokenizer", str(tmp_path / "missing.json")), "does not exist")


def test_sample_returns_documents_with_their_files(wh):
    docs = catalog.sample_documents(wh["db"], wh["sid"], n=3, split="train", seed=1, chars=40)
    assert len(docs) == 3 and all(d.split == "train" and len(d.text) <= 40 for d in docs)
    for d in docs:
        assert d.origins and all(source == "main" for source, _ in d.origins)
        assert all((wh["corpus"] / re.sub(r":\d+$", "", path).rsplit("/", 1)[-1]).is_file() for _, path in d.origins)
    assert [d.doc_id for d in catalog.sample_documents(wh["db"], wh["sid"], 3, "train", 1, 40)] == [d.doc_id for d in docs]
    assert {d.doc_id for d in catalog.sample_documents(wh["db"], wh["sid"], 3, "train", 2, 40)} != {d.doc_id for d in docs}
    out = ok("sample", wh["sid"][:5], "-n", "3", "--seed", "1", "--chars", "40")
    assert out.count("· train ·") == 3 and str(wh["corpus"]) in out
    one_line_error(invoke("sample", wh["sid"], "--split", "dev"), "unknown split 'dev'")


def test_export_to_parquet_reads_back(wh, tmp_path):
    out_dir = tmp_path / "export"
    out = ok("export", wh["sid"], str(out_dir))
    expected = dict(sql(wh, "SELECT split, count(*) FROM snapshot_documents WHERE snapshot_id = ? GROUP BY split",
                        wh["sid"]))
    files = f"read_parquet('{out_dir}/**/*.parquet', hive_partitioning = true)"
    with duckdb.connect() as con:
        got = dict(con.execute(f"SELECT split, count(*) FROM {files} GROUP BY split").fetchall())
        columns = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{out_dir}/split=train/*.parquet')")
                   .fetchall()]
        no_path = con.execute(f"SELECT count(*) FROM {files} WHERE path IS NULL").fetchone()[0]
    assert got == expected and sum(got.values()) == 32
    assert columns[:5] == ["doc_id", "text", "n_chars", "source", "path"] and no_path == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["_snapshot.json"] + sorted(f"split={s}" for s in expected)
    meta = json.loads((out_dir / "_snapshot.json").read_text())
    assert meta["snapshot_id"] == wh["sid"] and meta["n_documents"] == 32
    assert "32 documents" in out

    one_line_error(invoke("export", wh["sid"], str(out_dir)), "not empty", "--overwrite")
    ok("export", wh["sid"], str(out_dir), "--overwrite", "--partition", "none")
    assert sorted(p.name for p in out_dir.iterdir()) == ["_snapshot.json", "data.parquet"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    one_line_error(invoke("export", wh["sid"], str(mine), "--overwrite"), "no previous export")
    assert (mine / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary folder was left behind"


def test_lineage_of_a_snapshot_lists_its_files(wh):
    lin = json.loads(ok("lineage", wh["sid"], "--json"))
    files = {f["path"].rsplit("/", 1)[-1]: f["documents"] for f in lin["files"]}
    good = {p.name for p in wh["corpus"].iterdir()} - {"empty.txt", "binary.txt"}
    assert set(files) == good
    assert files["docs.jsonl"] == N_GOOD // 3 and files["copy_of_doc0.txt"] == 1
    assert lin["run"] is None and lin["n_documents"] == 32
    assert "docs.jsonl" in ok("lineage", wh["sid"][:8])


def test_lineage_of_an_mlflow_run(wh, monkeypatch):
    from mlflow import MlflowClient

    home = wh["db"].parent
    monkeypatch.setenv("PRETRAIN_HOME", str(home))
    c = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")  # where tasks.workspace puts the store
    exp = c.create_experiment("lineage-test", artifact_location=(home / "mlartifacts").as_uri())
    variant = c.create_run(exp, run_name="mlm").info.run_id
    c.log_param(variant, "snapshot_id", wh["sid"])
    cell = c.create_run(exp, run_name="mlm/full/s0", tags={"mlflow.parentRunId": variant}).info.run_id
    untracked = c.create_run(exp, run_name="other").info.run_id

    lin = json.loads(ok("lineage", variant, "--json"))
    assert lin["snapshot_id"] == wh["sid"] and lin["run"]["run_id"] == variant and len(lin["files"]) == 24
    via_parent = json.loads(ok("lineage", cell, "--json"))
    assert via_parent["snapshot_id"] == wh["sid"] and via_parent["run"]["found_on"] == variant
    one_line_error(invoke("lineage", untracked), "no snapshot_id param or tag")
    one_line_error(invoke("lineage", "0" * 32), "no MLflow run with that id", "pretrain data snapshots")


def test_unknown_snapshot_and_missing_warehouse_are_one_line(wh, tmp_path, monkeypatch):
    one_line_error(invoke("stats", "ffff0000"), "no snapshot 'ffff0000'", "pretrain data snapshots")
    one_line_error(invoke("export", "ab", str(tmp_path / "x")), "at least 4 characters")
    monkeypatch.setenv("PRETRAIN_HOME", str(tmp_path / "empty-home"))
    one_line_error(invoke("snapshots"), "no warehouse", "pretrain data add")
    one_line_error(invoke("ingest"), "no sources declared")


def test_format_and_source_selection(tmp_path, monkeypatch):
    monkeypatch.setenv("PRETRAIN_HOME", str(tmp_path / "home"))
    (tmp_path / "logs").mkdir()
    for i in range(3):
        (tmp_path / "logs" / f"run{i}.log").write_text(f"log {i}: the training loss went down steadily after warmup.\n")
    write_corpus(tmp_path / "other", 3)
    ok("add", "logs", str(tmp_path / "logs"))
    ok("add", "other", str(tmp_path / "other"))
    one_line_error(invoke("ingest", "logs"), "corpus is empty")  # .log is no known extension
    assert "format auto -> txt" in ok("add", "logs", str(tmp_path / "logs"), "--format", "txt")
    out = ok("ingest", "logs")
    [snap] = json.loads(ok("snapshots", "--json"))
    assert snap["sources"] == ["logs"] and snap["n_documents"] == 3 and snap["snapshot_id"] in out
    [acc] = catalog.source_report(tmp_path / "home" / "warehouse.duckdb")  # "other" was never ingested
    # The first try's rejects are superseded: each .log file is now an accepted input, counted once.
    assert (acc.source, acc.inputs, acc.accepted, acc.rejected, acc.reasons) == ("logs", 3, 3, 0, {})
    assert "removed source other" in ok("remove", "other")
    one_line_error(invoke("remove", "other"), "not declared")
    assert "other" not in ok("sources")
