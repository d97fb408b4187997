"""The pipeline configuration: YAML presets + `--set key=value` overrides, unknown keys rejected."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model.config import ConfigError, ModelConfig, TrainConfig, load_dataclass
from model.finetune import METHODS, FinetuneConfig
from model.objectives import OBJECTIVES
from warehouse.dedup import NearDupConfig
from warehouse.quality import QualityConfig
from warehouse.sources import SourceSpec
from warehouse.tokenizer import TokenizerConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Set by the pipeline per objective; not user settings under `train:`.
RESERVED_TRAIN_KEYS = {"objective", "model", "data_dir", "out_dir", "specials"}


@dataclass
class CorpusConfig:
    name: str = "python-docs"
    sources: list[SourceSpec] = field(default_factory=lambda: [SourceSpec(name="python-docs", builtin="python-docs")])
    path: str = ""  # shortcut for one source: a folder, file or glob (formats in warehouse/formats.py)
    text_field: str = "text"  # the JSON field (dotted path) or CSV / Parquet column holding the text
    format: str = "auto"  # or txt, md, rst, html, jsonl, json, csv, tsv, parquet when the content misleads
    encoding_errors: str = "reject"  # or "replace": keep undecodable text with U+FFFD
    min_chars: int = 32
    val_frac: float = 0.05
    test_frac: float = 0.05
    quality: QualityConfig = field(default_factory=QualityConfig)  # C4 / Gopher-style filters at ingest
    near_dup: NearDupConfig = field(default_factory=NearDupConfig)  # MinHash LSH dedup of each snapshot

    def source_specs(self) -> list[SourceSpec]:
        if self.path:
            # Named after the corpus, never after a built-in source it replaces (e.g. in demo.yaml).
            name = self.name if self.name not in {s.builtin for s in self.sources} else "corpus"
            return [SourceSpec(name=name, path=self.path, text_field=self.text_field, format=self.format,
                               encoding_errors=self.encoding_errors)]
        return self.sources


@dataclass
class ModelSection:
    size: str = "mini"
    overrides: dict[str, Any] = field(default_factory=dict)  # any ModelConfig field, e.g. n_layers


@dataclass
class DownstreamConfig:
    task: str = "stdlib-module"  # the task's name; the built-in one unless `path` is set; "none" skips fine-tuning
    source: str = "python-docs"  # built-in task: the source whose labelled documents form it
    n_classes: int = 8
    min_chars: int = 80
    # A user's task: a CSV / TSV / JSONL / JSON / Parquet file, a folder of per-split files, or a
    # Hugging Face dataset saved with `save_to_disk`; columns named below.
    path: str = ""
    format: str = "auto"
    text_column: str = "text"
    text_pair_column: str = ""  # set for a text-pair task
    label_column: str = "label"
    split_column: str = ""  # a column holding train / validation / test; else files per split, else by hash
    val_frac: float = 0.15
    test_frac: float = 0.15
    seeds: list[int] = field(default_factory=lambda: [0])
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # Named fine-tuning methods, each a set of `finetune` keys over the ones above; `method`
    # defaults to the name, e.g. {full: {}, probe: {lr: 0.003, epochs: 20}, freeze-1: {method: freeze, freeze_layers: 1}}.
    methods: dict[str, dict] = field(default_factory=dict)
    contamination_n: int = 8  # word n-grams compared with the pretraining snapshot
    contamination_threshold: float = 0.1  # warn when more of an evaluation split than this overlaps

    def file_spec(self) -> dict:
        return {"path": self.path, "format": self.format, "text_column": self.text_column,
                "text_pair_column": self.text_pair_column, "label_column": self.label_column,
                "split_column": self.split_column}

    def method_configs(self) -> dict[str, FinetuneConfig]:
        if not self.methods:
            return {self.finetune.method: self.finetune}
        base = asdict(self.finetune)
        out = {}
        for name, overrides in self.methods.items():
            if not isinstance(overrides, dict):
                raise ConfigError(f"downstream.methods.{name} must be a mapping of finetune keys, e.g. {{lr: 0.001}}")
            out[name] = load_dataclass(FinetuneConfig, {**base, "method": name if name in METHODS else base["method"],
                                                        **overrides}, f"downstream.methods.{name}.")
        return out


TASK_RUNNERS = ("thread", "dask")
# [protocol://]host:port, checked at load: a typo would otherwise surface mid-study, after a 30 s connect timeout.
DASK_ADDRESS = re.compile(r"^([a-z]+://)?(\[[0-9a-fA-F:.]+\]|[^\s/:\[\]]+):\d+$")


@dataclass
class StudyConfig:
    sizes: list[str] = field(default_factory=list)  # model sizes crossed with the objectives; empty = model.size
    max_parallel: int = 1  # fine-tuning cells run at once; the CPU threads are shared out between them
    alpha: float = 0.05  # significance level of the paired tests (Holm-corrected)
    # Where the fine-tuning cells run: `thread` (a pool in the flow's process) or `dask` (worker
    # processes: a local cluster started for the study, or the cluster at `dask_address`).
    task_runner: str = "thread"
    dask_address: str = ""  # an existing scheduler, e.g. tcp://10.0.0.5:8786; empty = a local cluster
    dask_workers: int = 0  # worker processes of the local cluster; 0 = study.max_parallel

    def __post_init__(self):
        if self.task_runner not in TASK_RUNNERS:
            raise ConfigError(f"study.task_runner is {self.task_runner!r}; choose one of {', '.join(TASK_RUNNERS)}")
        if self.dask_address and self.task_runner != "dask":
            raise ConfigError(f"study.dask_address is set but study.task_runner is {self.task_runner!r}; "
                              "set study.task_runner: dask")
        if self.dask_address and not DASK_ADDRESS.match(str(self.dask_address)):
            raise ConfigError(f"study.dask_address {self.dask_address!r} is not a scheduler address; "
                              "e.g. tcp://10.0.0.5:8786")
        if self.dask_workers < 0 or (self.dask_workers and self.dask_address):
            raise ConfigError("study.dask_workers must be >= 0 and is for the local cluster only; "
                              "with study.dask_address the cluster's own workers run the cells")


@dataclass
class PipelineConfig:
    experiment: str = "pretrain-pipeline"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    objectives: list[str] = field(default_factory=lambda: ["mlm", "clm"])
    model: ModelSection = field(default_factory=ModelSection)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields shared by every objective
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    def sizes(self) -> list[str]:
        return self.study.sizes or [self.model.size]

    def validate(self) -> "PipelineConfig":
        for name in self.objectives:
            if name not in OBJECTIVES:
                raise ConfigError(f"unknown objective {name!r}; available objectives: {', '.join(OBJECTIVES)}")
        if not self.objectives:
            raise ConfigError("no objectives configured; set objectives: [mlm, clm]")
        reserved = RESERVED_TRAIN_KEYS.intersection(self.train)
        if reserved:
            raise ConfigError(f"train.{sorted(reserved)[0]} is set by the pipeline; list objectives under `objectives:` "
                              "and the model under `model:`")
        load_dataclass(TrainConfig, self.train, "train.")  # unknown keys / bad types fail now, not mid-run
        for size in self.sizes():
            self.model_config("encoder", 100, size)
        self.downstream.method_configs()
        if self.study.max_parallel < 1 or not 0 < self.study.alpha < 1:
            raise ConfigError("study.max_parallel must be >= 1 and study.alpha in (0, 1)")
        return self

    def model_config(self, arch: str, vocab_size: int, size: str | None = None) -> ModelConfig:
        overrides = dict(self.model.overrides)
        unknown = set(overrides) - set(ModelConfig.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown config key 'model.overrides.{sorted(unknown)[0]}'; "
                              f"valid keys: {', '.join(sorted(ModelConfig.__dataclass_fields__))}")
        overrides.setdefault("max_seq_len", max(512, int(self.train.get("seq_len", 128)) + 1))
        return ModelConfig.from_name(size or self.model.size, arch=arch, vocab_size=vocab_size, **overrides)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r} is not key=value; e.g. --set train.max_steps=100")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def resolve_config_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists() and (CONFIG_DIR / p).exists():
        p = CONFIG_DIR / p  # shipped presets by name, e.g. `--config demo.yaml`
    if not p.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a YAML file, e.g. --config configs/demo.yaml")
    return p


def read_sections(p: Path, expected: str) -> dict:
    """A config file's top-level mapping; invalid YAML or anything but a mapping is one line naming
    the `expected` sections."""
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections ({expected})")
    return data


def read_study_sections(path: str | Path, overrides: list[str], section: str,
                        owned: dict[tuple[str, ...], str]) -> tuple[dict, dict]:
    """A study config file: its `section` (e.g. `strategies:`) and the rest, a pipeline config, with the
    `--set` overrides applied. A key of `owned` (a path in the rest -> what sets it instead) that the
    file sets anyway would be silently overridden by the study, so it is refused in one line."""
    p = resolve_config_path(path)
    data = apply_overrides(read_sections(p, f"{section}, corpus, train, ..."), overrides)
    study = data.pop(section, None)
    if not isinstance(study, dict):
        raise ConfigError(f"config file {p} has no `{section}:` section; see configs/studies/{section}.yaml")
    for keys, owner in owned.items():
        node: Any = data
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if node is not None:
            raise ConfigError(f"{'.'.join(keys)} is set by {owner} in a {section} config; remove it")
    return study, data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    data: dict = {}
    if path:
        data = read_sections(resolve_config_path(path), "corpus, model, train, ...")
    data = apply_overrides(data, overrides or [])
    return load_dataclass(PipelineConfig, data).validate()


def config_hash(obj: Any) -> str:
    payload = json.dumps(asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]
