"""Hugging Face datasets as corpus sources: real datasets saved with save_to_disk (and a hub dataset in
a local cache built by hand), ingested into a real DuckDB warehouse. No network: hub names are read
offline (HF_HUB_OFFLINE=1, as `pretrain` sets it), with every cache pointed into tmp_path."""
import json
import random
import re

import duckdb
import pytest
from typer.testing import CliRunner

from tasks.data import source_fingerprint
from warehouse import store
from warehouse.sources import RawDoc, Reject, SourceError, SourceSpec, read_source

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()  # save_to_disk's bars would fill the captured output

WORDS = ("data model token train layer attention mask predict sentence corpus python function value return "
         "object module class method string list number file error test run loss").split()


def texts(n: int, seed: int = 0) -> list[str]:
    """Distinct sentence-like documents that pass the default quality filters."""
    rng = random.Random(seed)
    return [" ".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(6)) for _ in range(n)]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Offline, with the Hugging Face caches in tmp_path: nothing real is read or written."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    return tmp_path / "hf-datasets"


def save(folder, rows: dict, features=None):
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return folder


def rows_of(db, table: str, source: str) -> dict[str, str]:
    column = "reason" if table == "rejects" else "doc_id"
    with duckdb.connect(str(db), read_only=True) as con:
        return dict(con.execute(f"SELECT path, {column} FROM {table} WHERE source = ?", [source]).fetchall())


def one_line(exc: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_saved_dataset_rows_are_documents_or_rejects(tmp_path):
    good = texts(6)
    folder = save(tmp_path / "ds", {"text": [*good[:3], None, "", "x" * 2000, *good[3:]],
                                    "meta": [{"id": i} for i in range(9)]})
    db = tmp_path / "w.duckdb"
    report = store.ingest(db, [SourceSpec(name="hf", dataset=str(folder), max_doc_mb=0.001)])
    assert report.n_inputs == 9 and report.n_documents == 6 and report.n_rejects == 3
    assert report.n_documents + report.n_rejects == report.n_inputs

    where = f"hf:{folder}"
    assert set(rows_of(db, "provenance", "hf")) == {f"{where}#{i}" for i in (0, 1, 2, 6, 7, 8)}
    assert rows_of(db, "rejects", "hf") == {
        f"{where}#3": "no string field 'text'",  # None: the field is missing in this row
        f"{where}#4": "empty after cleaning",
        f"{where}#5": "document larger than 0.001 MB (corpus.sources[].max_doc_mb)",
    }
    with duckdb.connect(str(db), read_only=True) as con:
        stored = {r[0] for r in con.execute("SELECT text FROM documents").fetchall()}
    assert stored == set(good)


def test_dotted_text_field_and_non_string_rows(tmp_path):
    good = texts(3, seed=1)
    nested = save(tmp_path / "nested", {"meta": [{"body": good[0]}, {"body": None}, {"body": good[1]}]})
    items = list(read_source(SourceSpec(name="n", dataset=str(nested), text_field="meta.body")))
    assert [(type(i).__name__, i.path) for i in items] == [
        ("RawDoc", f"hf:{nested}#0"), ("Reject", f"hf:{nested}#1"), ("RawDoc", f"hf:{nested}#2")]
    assert items[1].reason == "no string field 'meta.body'"

    if not hasattr(datasets, "Json"):  # a per-row type: datasets 4+
        return
    mixed = save(tmp_path / "mixed", {"text": [good[2], 5, {"a": 1}, ["x"]]},
                 features=datasets.Features({"text": datasets.Json()}))
    items = list(read_source(SourceSpec(name="m", dataset=str(mixed))))
    assert isinstance(items[0], RawDoc) and items[0].text == good[2]
    assert [i.reason for i in items[1:]] == ["no string field 'text'"] * 3


def test_dataset_dict_split_is_chosen(tmp_path):
    train, validation = texts(4, seed=2), texts(2, seed=3)
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                          "validation": datasets.Dataset.from_dict({"text": validation})}).save_to_disk(str(folder))
    default = list(read_source(SourceSpec(name="d", dataset=str(folder))))
    assert [i.text for i in default] == train and default[0].path == f"hf:{folder}[train]#0"
    chosen = list(read_source(SourceSpec(name="d", dataset=str(folder), split="validation")))
    assert [(i.path, i.text) for i in chosen] == [(f"hf:{folder}[validation]#{n}", t) for n, t in enumerate(validation)]

    with pytest.raises(SourceError) as exc:
        list(read_source(SourceSpec(name="d", dataset=str(folder), split="test")))
    one_line(exc, "no split 'test'", "its splits: train, validation", "split")


def test_reingest_unchanged_adds_nothing_and_more_rows_do(tmp_path):
    folder = save(tmp_path / "ds", {"text": texts(5, seed=4)})
    spec = SourceSpec(name="hf", dataset=str(folder))
    db = tmp_path / "w.duckdb"
    before = source_fingerprint([spec.__dict__])
    assert store.ingest(db, [spec]).n_new == 5
    again = store.ingest(db, [spec])
    assert again.n_new == 0 and again.n_inputs == 5
    assert source_fingerprint([spec.__dict__]) == before  # the pipeline's ingest stage stays cached

    save(folder, {"text": texts(8, seed=4)})  # the same 5 rows and 3 more
    assert source_fingerprint([spec.__dict__]) != before
    grown = store.ingest(db, [spec])
    assert grown.n_inputs == 8 and grown.n_new == 3
    assert len(rows_of(db, "provenance", "hf")) == 8


def test_declaration_mistakes_are_one_line(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    (files / "a.jsonl").write_text('{"text": "hello"}\n')
    folder = save(tmp_path / "ds", {"text": texts(2), "n": [1, 2], "meta": [{"body": "a"}, {"body": "b"}]})
    cases = [
        (dict(), "sets none of path, builtin and dataset"),
        (dict(path=str(files), dataset=str(folder)), "sets path and dataset"),
        (dict(path=str(files), split="train"), "split applies to a dataset source only"),
        (dict(dataset=str(folder), format="csv"), "format applies to files"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(SourceError) as exc:
            SourceSpec(name="s", **kwargs)
        one_line(exc, needle)
    reads = [
        (dict(dataset=str(files)), "not a dataset saved with save_to_disk", "declare data files"),
        (dict(dataset=str(tmp_path / "missing")), "does not exist"),
        (dict(dataset=str(folder), split="train"), "holds one Dataset, not a DatasetDict"),
        (dict(dataset=str(folder), text_field="body"), "no column 'body' (its columns: 'text', 'n', 'meta')"),
        (dict(dataset=str(folder), text_field="n"), "column 'n' is not text (int64)"),
        (dict(dataset=str(folder), text_field="meta"), "a struct of body", "meta.body"),
    ]
    for kwargs, *needles in reads:
        with pytest.raises(SourceError) as exc:
            list(read_source(SourceSpec(name="s", **kwargs)))
        one_line(exc, *needles)


def test_hub_name_offline_and_not_cached_is_one_line(tmp_path, hf_cache):
    spec = SourceSpec(name="hub", dataset="someone/not-cached", split="train")
    for attempt in (lambda: list(read_source(spec)), lambda: source_fingerprint([spec.__dict__]),
                    lambda: store.ingest(tmp_path / "w.duckdb", [spec])):
        with pytest.raises(SourceError) as exc:
            attempt()
        one_line(exc, "'someone/not-cached'", "not a folder here nor in the local datasets cache", str(hf_cache),
                 "HF_HUB_OFFLINE=1", "save_to_disk", "dataset:")
    assert not (tmp_path / "w.duckdb").exists()  # failed before any write

    (hf_cache / "someone___not-cached").mkdir(parents=True)  # a cache folder without the prepared dataset
    with pytest.raises(SourceError) as exc:
        list(read_source(spec))
    one_line(exc, "HF_HUB_OFFLINE=1 forbids downloading it")


def _cache_hub_dataset(cache, name: str, rows: list, revision: str = "abc123"):
    """A hub dataset as `load_dataset` leaves it in the datasets cache: CACHE/owner___name/CONFIG/
    VERSION/HASH with an Arrow stream per split and dataset_info.json (built by hand: no network)."""
    import pyarrow as pa

    owner, base = name.split("/")
    folder = cache / f"{owner}___{base}" / "default" / "0.0.0" / revision
    folder.mkdir(parents=True)
    table = pa.table({"text": pa.array(rows, pa.string())})
    with pa.ipc.new_stream(str(folder / f"{base}-train.arrow"), table.schema) as writer:
        writer.write_table(table)
    splits = datasets.SplitDict(dataset_name=base)
    splits.add(datasets.SplitInfo("train", num_examples=len(rows), dataset_name=base))
    datasets.DatasetInfo(features=datasets.Features({"text": datasets.Value("string")}), config_name="default",
                         splits=splits).write_to_directory(str(folder))


def test_cached_hub_dataset_streams_offline(tmp_path, hf_cache):
    good = texts(3, seed=5)
    _cache_hub_dataset(hf_cache, "someone/tiny", [good[0], None, good[1], good[2]])
    spec = SourceSpec(name="hub", dataset="someone/tiny")
    items = list(read_source(spec))
    assert [i.path for i in items] == [f"hf:someone/tiny[train]#{n}" for n in range(4)]
    assert isinstance(items[1], Reject) and items[1].reason == "no string field 'text'"
    assert [i.text for i in items if isinstance(i, RawDoc)] == good

    [fp] = source_fingerprint([spec.__dict__])
    assert fp[:4] == ["hf", "someone/tiny", "", "train"] and fp[4][0].startswith("default/0.0.0/abc123/")
    _cache_hub_dataset(hf_cache, "someone/tiny", good, revision="def456")  # a newer revision downloaded
    assert source_fingerprint([spec.__dict__])[0] != fp


def invoke(*args: str):
    from flows.cli import app

    return CliRunner().invoke(app, ["data", *args], env={"COLUMNS": "200"})


def cli_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_data_add_dataset_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PRETRAIN_HOME", str(tmp_path / "home"))
    good = texts(5, seed=6)
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": good[:1]}),
                          "validation": datasets.Dataset.from_dict({"body": [*good[1:], None]})}).save_to_disk(str(folder))

    added = invoke("add", "hfdocs", "--dataset", str(folder), "--split", "validation", "--text-field", "body",
                   "--max-doc-mb", "2")
    assert added.exit_code == 0, added.output
    assert f"added source hfdocs: hf:{folder}[validation]" in added.stdout
    assert "already declared" in invoke("add", "hfdocs", "--dataset", str(folder), "--split", "validation",
                                        "--text-field", "body", "--max-doc-mb", "2").stdout
    listed = invoke("sources").stdout
    assert "hfdocs" in listed and f"hf:{folder}[validation]" in listed

    ingested = invoke("ingest", "hfdocs")
    assert ingested.exit_code == 0, ingested.output
    assert re.search(r"│\s+5 │\s+4 │\s+4 │\s+1 │", ingested.stdout), ingested.stdout  # inputs, documents, new, rejects
    assert "no string field" in ingested.stdout
    sid = re.search(r"snapshot (\w{16})", ingested.stdout).group(1)
    lineage = json.loads(invoke("lineage", sid, "--json").stdout)  # the dataset split, not each of its rows
    assert [(f["source"], f["path"]) for f in lineage["files"]] == [("hfdocs", f"hf:{folder}[validation]")]
    assert lineage["files"][0]["documents"] == lineage["n_documents"]

    replaced = invoke("add", "hfdocs", "--dataset", str(folder), "--text-field", "body", "--encoding-errors", "replace")
    assert "replaced source hfdocs" in replaced.stdout
    assert "split validation -> default" in replaced.stdout and "encoding_errors default -> replace" in replaced.stdout

    cli_error(invoke("add", "x", str(tmp_path), "--dataset", str(folder)), "not both")
    cli_error(invoke("add", "x"), "give a PATH (files) or --dataset")
    cli_error(invoke("add", "x", str(tmp_path), "--split", "train"), "--split applies to --dataset only")
    cli_error(invoke("add", "x", "--dataset", str(folder), "--format", "csv"), "--format applies to files")
    cli_error(invoke("add", "x", str(tmp_path), "--encoding-errors", "ignore"), "unknown --encoding-errors 'ignore'")
    cli_error(invoke("add", "x", str(tmp_path), "--max-doc-mb", "0"), "--max-doc-mb must be a positive number")
    cli_error(invoke("add", "x", "--dataset", str(tmp_path)), "not a dataset saved with save_to_disk")

    hub = invoke("add", "hub", "--dataset", "someone/not-cached")  # declared; cannot be read here, and says so
    assert hub.exit_code == 0 and "note" in hub.stdout and "HF_HUB_OFFLINE=1" in hub.stdout, hub.output
    cli_error(invoke("ingest", "hub"), "not a folder here nor in the local datasets cache", "save_to_disk")
