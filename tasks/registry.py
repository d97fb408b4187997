"""The MLflow model registry of continual pretraining, and the gate a new model must pass to take the alias.

Every update registers its candidate as a new version of one registered model, tagged with the
snapshot it was trained on, its checkpoint and tokenizer; the alias (e.g. `champion`) moves to it
only when the gate passes. The registry is thus also the ledger of processed snapshots: a
snapshot some version is tagged with has been trained on, whether its candidate passed or not.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from model.config import ConfigError

if TYPE_CHECKING:  # MLflow is imported by the functions that use it: a run with no new data never needs it
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient


@dataclass
class GateConfig:
    # Nats: the candidate's mean held-out loss on the earlier snapshots' data may exceed the
    # champion's by this much (0: no forgetting allowed; negative: it must improve on the old data).
    max_old_loss_increase: float = 0.05
    # Fraction: the candidate's downstream validation accuracy may fall this far below the champion's.
    max_score_drop: float = 0.02

    def __post_init__(self) -> None:
        for key in ("max_old_loss_increase", "max_score_drop"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ConfigError(f"continual.gate.{key} must be a number, got {value!r}")


@dataclass
class Scores:
    """What the gate compares: nan where it was not measured (no earlier data, no downstream task)."""

    old_loss: float = math.nan  # mean held-out loss over the earlier snapshots' data
    score: float = math.nan  # downstream validation accuracy, mean over seeds


@dataclass
class GateDecision:
    passed: bool
    decision: str  # first | passed | failed
    reasons: list[str] = field(default_factory=list)
    numbers: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        return f"{self.decision}: " + "; ".join(self.reasons)


def _known(x: float) -> bool:
    return not math.isnan(x)


def apply_gate(candidate: Scores, champion: Scores | None, cfg: GateConfig) -> GateDecision:
    """Does the candidate replace the champion? Each check runs only where both sides were measured.

    Downstream scores are validation scores: deciding on test scores would make the reported test
    score of the champion a biased one.
    """
    numbers = {"candidate_old_loss": candidate.old_loss, "candidate_score": candidate.score,
               "max_old_loss_increase": float(cfg.max_old_loss_increase), "max_score_drop": float(cfg.max_score_drop)}
    if champion is None:
        return GateDecision(True, "first", ["no champion yet: the first model takes the alias"], numbers)
    numbers.update({"champion_old_loss": champion.old_loss, "champion_score": champion.score})
    reasons, passed = [], True
    if _known(candidate.old_loss) and _known(champion.old_loss):
        increase = candidate.old_loss - champion.old_loss
        numbers["old_loss_increase"] = increase
        ok = increase <= cfg.max_old_loss_increase
        passed &= ok
        reasons.append(f"held-out loss on earlier data {champion.old_loss:.4f} -> {candidate.old_loss:.4f} "
                       f"({increase:+.4f} {'<=' if ok else '>'} {cfg.max_old_loss_increase:g})")
    else:
        reasons.append("held-out loss on earlier data not compared (no earlier held-out rows)")
    if _known(candidate.score) and _known(champion.score):
        drop = champion.score - candidate.score
        numbers["score_drop"] = drop
        ok = drop <= cfg.max_score_drop
        passed &= ok
        reasons.append(f"downstream validation accuracy {champion.score:.4f} -> {candidate.score:.4f} "
                       f"(drop {drop:+.4f} {'<=' if ok else '>'} {cfg.max_score_drop:g})")
    else:
        reasons.append("downstream score not compared (no downstream task)")
    return GateDecision(passed, "passed" if passed else "failed", reasons, numbers)


def ensure_registered_model(c: MlflowClient, name: str, description: str = "") -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.create_registered_model(name, description=description or None)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def versions(c: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of the registered model, oldest first (none when it does not exist yet)."""
    found = c.search_model_versions(f"name = '{name}'")
    return sorted(found, key=lambda v: int(v.version))


def champion(c: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return None
        raise


def register(c: MlflowClient, name: str, source: str, run_id: str, tags: dict[str, str], description: str = "") -> str:
    """A new version of `name` from a run's artefact; returns its version number."""
    ensure_registered_model(c, name)
    version = c.create_model_version(name, source=source, run_id=run_id, description=description or None,
                                     tags={k: str(v) for k, v in tags.items()})
    return str(version.version)


def record_gate(c: MlflowClient, name: str, version: str, decision: GateDecision) -> None:
    """The gate's decision on the version itself, so that the registry UI shows why the alias did (not) move."""
    c.set_model_version_tag(name, version, "gate", decision.decision)
    c.set_model_version_tag(name, version, "gate_reasons", decision.summary()[:5000])


def promote(c: MlflowClient, name: str, alias: str, version: str) -> None:
    c.set_registered_model_alias(name, alias, version)


def gate_metrics(decision: GateDecision) -> dict[str, float]:
    return {f"gate/{k}": v for k, v in decision.numbers.items() if _known(v)} | {"gate/passed": float(decision.passed)}


def as_dict(decision: GateDecision) -> dict:
    return asdict(decision)
