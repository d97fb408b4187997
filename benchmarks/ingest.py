"""Corpus to token shards: this project's warehouse against the `datasets` path, side by side.

The corpus is N MB of real text: the Python documentation shipped with the interpreter
(`warehouse.builtin.python_docs`) and the text under /usr/share/doc (plain and .gz), repeated with
variation (each text numbered; past the first copy, the words of each line shuffled) so that dedup
keeps every copy,
written as .txt files of ~8 KB, one document each. A byte-level BPE tokenizer (vocab 8k) is trained
once on a sample. Then, for each size, each side runs in a fresh process:

- ours: `store.ingest` (clean, hash, dedup, lineage) + `create_snapshot` (splits) + `write_token_shards`
- datasets: `load_dataset("text", sample_by="document")` + `.map(tokenize, batched=True,
  num_proc=os.cpu_count())` + `save_to_disk`, the path a user would otherwise take

Peak memory is that of the side's whole process tree (the datasets workers included), polled with
psutil: RSS summed, and PSS summed (shared pages split between the processes that share them, so a
forked worker does not count its parent's pages twice). Everything is written under one temporary
folder (the Hugging Face cache too, offline) and removed at the end unless --keep.

    python benchmarks/ingest.py --sizes 8,16            # a quick run
    python benchmarks/ingest.py --sizes 64,256,1024 --json ingest.json
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FILE_BYTES = 8 * 1024  # one corpus file, one document, of about this size (more where a base text is longer)
SAMPLE_CHARS = 8 * 2**20  # the tokenizer's training sample
DOC_FOLDERS = ("/usr/share/doc",)
NOT_PROSE = {".html", ".htm", ".css", ".js", ".svg", ".xml", ".json", ".png", ".gif", ".jpg", ".pdf", ".c", ".h",
             ".py", ".pl", ".cocci", ".sh"}


def base_texts() -> list[str]:
    """The real text the corpus is made of: Python's documentation and the system's package docs."""
    from warehouse.builtin import python_docs

    texts = [d.text for d in python_docs("bench")]
    for root in DOC_FOLDERS:
        for path in sorted(Path(root).rglob("*")):
            name = path.name.removesuffix(".gz")
            if path.is_symlink() or not path.is_file() or Path(name).suffix.lower() in NOT_PROSE:
                continue
            try:
                data = path.read_bytes()
                if path.suffix == ".gz":
                    data = gzip.decompress(data)
                text = data.decode("utf-8")
            except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError):
                continue
            if "\x00" not in text and len(text) >= 200:
                texts.append(text[:256 * 1024])
    return texts


def vary(text: str, index: int, copy: int, rng: random.Random) -> str:
    """The text numbered (so that two equal base texts differ too) and, past copy 0, its words shuffled
    within each line."""
    if copy:
        lines = []
        for line in text.split("\n"):
            words = line.split(" ")
            rng.shuffle(words)
            lines.append(" ".join(words))
        text = "\n".join(lines)
    return f"[copy {copy}, text {index}]\n{text}"


def write_corpus(folder: Path, megabytes: int, texts: list[str]) -> list[tuple[Path, int]]:
    """Files of ~FILE_BYTES until `megabytes` MB; returns (file, cumulative bytes) in order."""
    rng = random.Random(0)
    files, total, parts, size, copy = [], 0, [], 0, 0
    while total < megabytes * 2**20:
        for index, text in enumerate(texts):
            parts.append(vary(text, index, copy, rng))
            size += len(parts[-1].encode())
            if size < FILE_BYTES:
                continue
            path = folder / f"{len(files) // 1000:04d}" / f"{len(files):07d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n\n".join(parts), encoding="utf-8")
            total += path.stat().st_size
            files.append((path, total))
            parts, size = [], 0
            if total >= megabytes * 2**20:
                break
        copy += 1
    return files


def corpus_of(files: list[tuple[Path, int]], megabytes: int, folder: Path) -> int:
    """A folder with the first files adding up to `megabytes` MB (hard links: nothing is copied); its bytes."""
    total = 0
    for path, cumulative in files:
        target = folder / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
        total = cumulative
        if cumulative >= megabytes * 2**20:
            break
    return total


def train_bpe(texts: list[str], path: Path, vocab: int, sample_chars: int = SAMPLE_CHARS) -> None:
    """Byte-level BPE as the project trains it (warehouse.tokenizer), on an evenly spread sample."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    step = max(1, sum(map(len, texts)) // sample_chars)
    sample = texts[::step]

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, show_progress=False,
                                  special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample, trainer)
    tok.save(str(path))


# ---- one side, in its own process ----------------------------------------------------------------

def run_ours(corpus: Path, tokenizer: Path, work: Path) -> dict:
    from warehouse import store
    from warehouse.shards import write_token_shards
    from warehouse.sources import SourceSpec

    db, t0 = work / "warehouse.duckdb", time.perf_counter()
    report = store.ingest(db, [SourceSpec(name="bench", path=str(corpus))])
    t1 = time.perf_counter()
    snap = store.create_snapshot(db, "bench", ["bench"], 0.005, 0.005)
    t2 = time.perf_counter()
    counts = write_token_shards(db, snap.snapshot_id, tokenizer, work / "shards")
    t3 = time.perf_counter()
    return {"stages": {"ingest": t1 - t0, "snapshot": t2 - t1, "shards": t3 - t2},
            "documents": report.n_documents, "duplicates": report.n_duplicates, "rejects": report.n_rejects,
            "tokens": sum(c["tokens"] for c in counts.values())}


_TOKENIZER = None


def _tokenize(batch: dict) -> dict:
    global _TOKENIZER
    if _TOKENIZER is None:  # loaded in each worker process
        from tokenizers import Tokenizer

        _TOKENIZER = Tokenizer.from_file(os.environ["BENCH_TOKENIZER"])
    return {"input_ids": [e.ids for e in _TOKENIZER.encode_batch_fast(batch["text"], add_special_tokens=False)]}


def run_datasets(corpus: Path, tokenizer: Path, work: Path) -> dict:
    import datasets

    datasets.disable_progress_bars()
    os.environ["BENCH_TOKENIZER"] = str(tokenizer)
    t0 = time.perf_counter()
    ds = datasets.load_dataset("text", data_files=str(corpus / "**" / "*.txt"), sample_by="document",
                               split="train", cache_dir=str(work / "hf-cache"))
    t1 = time.perf_counter()
    ds = ds.map(_tokenize, batched=True, num_proc=os.cpu_count(), remove_columns=["text"])
    t2 = time.perf_counter()
    ds.save_to_disk(str(work / "hf-dataset"))
    t3 = time.perf_counter()
    return {"stages": {"load": t1 - t0, "map": t2 - t1, "save": t3 - t2}, "documents": len(ds),
            "tokens": sum(len(x) for batch in ds.iter(batch_size=4096) for x in batch["input_ids"])}


def side(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True)
    fn = run_ours if args.side == "ours" else run_datasets
    result = fn(Path(args.corpus), Path(args.tokenizer), work)
    result["seconds"] = sum(result["stages"].values())
    print("RESULT " + json.dumps(result), flush=True)


# ---- the driver ----------------------------------------------------------------------------------

def _tree_memory(pid: int, peak: dict, done: threading.Event) -> None:
    """Polls the summed RSS and PSS of a process and its children until `done`."""
    import psutil

    root = psutil.Process(pid)
    while not done.is_set():
        rss = pss = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    m = p.memory_full_info()
                    rss, pss = rss + m.rss, pss + m.pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        except psutil.NoSuchProcess:
            return
        peak["rss"], peak["pss"] = max(peak.get("rss", 0), rss), max(peak.get("pss", 0), pss)
        done.wait(0.05)


def measure(which: str, corpus: Path, tokenizer: Path, work: Path, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--side", which, "--corpus", str(corpus), "--tokenizer", str(tokenizer),
           "--work", str(work)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, done = {}, threading.Event()
    poller = threading.Thread(target=_tree_memory, args=(proc.pid, peak, done), daemon=True)
    poller.start()
    out, err = proc.communicate()
    done.set()
    poller.join()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"the {which} side failed (exit {proc.returncode}):\n{err[-3000:]}")
    return {**json.loads(lines[-1][len("RESULT "):]), "peak_rss_mb": peak.get("rss", 0) / 2**20,
            "peak_pss_mb": peak.get("pss", 0) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256,1024", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--json", default="", help="write the results to this file too")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    for hidden in ("--side", "--corpus", "--tokenizer", "--work"):
        parser.add_argument(hidden, default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return side(args)
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf-home"),
           "HF_DATASETS_CACHE": str(root / "hf-home" / "datasets"), "PYTHONPATH": str(Path(__file__).parent.parent)}
    try:
        t0 = time.perf_counter()
        texts = base_texts()
        files = write_corpus(root / "all", max(sizes), texts)
        print(f"corpus: {sum(map(len, texts)) / 2**20:.1f} MB of base text, {len(texts):,} texts; "
              f"{len(files):,} files, {files[-1][1] / 2**20:.0f} MB written in {time.perf_counter() - t0:.0f} s")
        tokenizer = root / "tokenizer.json"
        t0 = time.perf_counter()
        train_bpe(texts, tokenizer, args.vocab)
        print(f"tokenizer: byte-level BPE, vocab {args.vocab}, trained in {time.perf_counter() - t0:.0f} s")
        rows = []
        for size in sizes:
            corpus = root / f"corpus-{size}MB"
            nbytes = corpus_of(files, size, corpus)
            row = {"mb": nbytes / 2**20, "files": sum(1 for _ in corpus.rglob("*.txt"))}
            for which in ("ours", "datasets"):
                row[which] = measure(which, corpus, tokenizer, root / f"{which}-{size}MB", env)
                row[which]["mb_per_s"] = row["mb"] / row[which]["seconds"]
                shutil.rmtree(root / f"{which}-{size}MB")  # the next run starts on an empty disk cache
            row["speed_ratio"] = row["ours"]["mb_per_s"] / row["datasets"]["mb_per_s"]
            row["memory_ratio"] = row["ours"]["peak_pss_mb"] / row["datasets"]["peak_pss_mb"]
            rows.append(row)
            print(f"{size} MB done: ours {row['ours']['seconds']:.1f} s, datasets {row['datasets']['seconds']:.1f} s",
                  flush=True)
        print_table(rows)
        if args.json:
            machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
            Path(args.json).write_text(json.dumps({"machine": machine, "args": vars(args), "results": rows}, indent=2))
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"corpus -> token shards on {os.cpu_count()} cores; peak memory: PSS of the process tree")
    for col in ("MB", "ours s", "MB/s", "peak MB", "datasets s", "MB/s", "peak MB", "speed ours/ds", "memory ours/ds"):
        table.add_column(col, justify="right")
    for r in rows:
        o, d = r["ours"], r["datasets"]
        table.add_row(f"{r['mb']:.0f}", f"{o['seconds']:.1f}", f"{o['mb_per_s']:.2f}", f"{o['peak_pss_mb']:.0f}",
                      f"{d['seconds']:.1f}", f"{d['mb_per_s']:.2f}", f"{d['peak_pss_mb']:.0f}",
                      f"{r['speed_ratio']:.2f}x", f"{r['memory_ratio']:.2f}x")
    console = Console(width=120)
    console.print(table)
    for r in rows:
        o, d = r["ours"], r["datasets"]
        console.print(f"{r['mb']:.0f} MB, stages (s): ours " + ", ".join(f"{k} {v:.1f}" for k, v in o["stages"].items())
                      + "; datasets " + ", ".join(f"{k} {v:.1f}" for k, v in d["stages"].items())
                      + f". Peak RSS summed: ours {o['peak_rss_mb']:.0f} MB, datasets {d['peak_rss_mb']:.0f} MB. "
                        f"Tokens: ours {o['tokens']:,}, datasets {d['tokens']:,}", highlight=False)


if __name__ == "__main__":
    main()
