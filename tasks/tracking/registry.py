"""The model registry's promotion policy: a new version becomes champion only when strictly better."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient


@dataclass(frozen=True)
class Champion:
    version: str
    value: float | None  # its promote metric, None when it has none (e.g. set by hand)


@dataclass(frozen=True)
class Promotion:
    aliases: dict[str, str]  # alias -> version, to set
    decision: str  # in words, with both numbers


@dataclass(frozen=True)
class Floor:
    value: float  # the promote metric must be strictly better than this
    reason: str  # what it is, e.g. "chance: the majority class's share of the test set"


def decide_promotion(name: str, version: str, metric: str, value: float, champion: Champion | None,
                     min_improvement: float, floor: Floor | None = None) -> Promotion:
    """Alias `champion` for the new version if it beats the champion's `metric` by at least `min_improvement` (lower
    is better for losses; the old champion becomes `previous-champion`); else alias `challenger`. A model without a
    champion, or whose champion lacks the metric, gets its first champion. A value that is not finite, or no better
    than `floor`, gets no alias at all."""
    lower_is_better = "loss" in metric
    if not math.isfinite(value) or (floor and (value >= floor.value if lower_is_better else value <= floor.value)):
        reason = "it is not finite" if not math.isfinite(value) else f"it is no better than {floor.value:.4f} ({floor.reason})"
        return Promotion({}, f"version {version} of {name} is not promoted: {metric} {value:.4f}, and {reason}")
    if champion is None or champion.value is None:
        before = f"version {champion.version} had no {metric}" if champion else "there was none"
        return Promotion({"champion": version}, f"version {version} is the champion of {name} ({metric} {value:.4f}; {before})")
    gain = champion.value - value if lower_is_better else value - champion.value
    if gain > 0 and gain >= min_improvement:
        aliases, verdict = {"previous-champion": champion.version, "champion": version}, "is the new champion"
    else:
        aliases, verdict = {"challenger": version}, "stays challenger"
    return Promotion(aliases, (
        f"version {version} {verdict} of {name}: {metric} {value:.4f} against champion version "
        f"{champion.version}'s {champion.value:.4f} (min_improvement {min_improvement})"
    ))


def current_champion(client: MlflowClient, name: str, metric: str) -> Champion | None:
    version = champion_version(client, name)
    if version is None:
        return None
    value = version.tags.get(metric)
    return Champion(str(version.version), float(value) if value is not None else None)


def promote(client: MlflowClient, name: str, version: str, metric: str, value: float, min_improvement: float,
            floor: Floor | None = None) -> str:
    """Apply `decide_promotion` against the current champion; returns the decision in words."""
    champion = current_champion(client, name, metric)
    promotion = decide_promotion(name, version, metric, value, champion, min_improvement, floor)
    for alias, aliased in promotion.aliases.items():
        client.set_registered_model_alias(name, alias, aliased)
    return promotion.decision


def champion_version(client: MlflowClient, name: str):
    """The model version holding alias `champion`, or None when the model or the alias does not exist."""
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return client.get_model_version(name, aliases["champion"]) if "champion" in aliases else None
