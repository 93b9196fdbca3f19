"""Scores samples against a reference: FID always; precision/recall, KID and IS where features exist.

``evaluate(samples, reference, settings)`` is the whole command without flags: it opens both inputs
(``lidiff.eval.sources``), streams image inputs through the Inception (``lidiff.eval.features``), and returns a
JSON-ready dict with every number and how it was computed (inputs, N of each side, resize, weights, devices).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from absl import logging

from lidiff.eval import sources
from lidiff.eval.errors import EvalInputError
from lidiff.eval.features import InceptionExtractor, extract
from lidiff.metrics import feature_metrics
from lidiff.metrics.fid import FeatureStats, frechet_distance, save_stats
from lidiff.models.inception import NUM_FEATURES, RESIZE

RANDOM_NOTE = "RANDOM INCEPTION WEIGHTS: these numbers are not FID/IS/KID/precision/recall and measure nothing"


@dataclasses.dataclass
class Settings:
    """How to score; mirrors the command's flags."""

    variables: Any  # Inception variables, or a function returning them (called only if an input needs the network)
    weights: str  # where they came from (a path, or "random (seed 0)")
    random_inception: bool = False
    num_samples: int | None = None  # cap on images read from the samples input
    num_reference: int | None = None  # cap on images read from the reference input
    batch_size: int = 64
    mesh: jax.sharding.Mesh | None = None
    max_pr_features: int = 10_000  # features kept per side for precision/recall and KID
    pr_k: int = 3
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    is_splits: int = 10
    seed: int = 0
    progress: bool = True
    save_stats: str | None = None  # write the samples' mu/sigma here (pytorch-fid format)
    sampling: sources.Sampling = dataclasses.field(default_factory=sources.Sampling)  # for run directories


@dataclasses.dataclass
class _Side:
    name: str
    description: dict
    stats: FeatureStats
    features: np.ndarray | None = None
    logits: np.ndarray | None = None


def _features_of(name: str, inp: Any, extractor: InceptionExtractor | None, settings: Settings) -> _Side:
    description = inp.describe()
    if isinstance(inp, sources.StatsInput):
        return _Side(name, description, inp.stats)
    if isinstance(inp, sources.ActivationsInput):
        feats = inp.features.astype(np.float64)
        if len(feats) < 2:
            raise EvalInputError(f"{name}: {inp.path} holds {len(feats)} activation rows; FID needs at least 2")
        stats = FeatureStats(feats.mean(0), np.cov(feats, rowvar=False), len(feats))
        keep = np.random.default_rng(settings.seed).permutation(len(feats))[: settings.max_pr_features]
        return _Side(name, description, stats, inp.features[np.sort(keep)])
    if inp.num_images < 2:
        raise EvalInputError(f"{name}: {description.get('path')} has {inp.num_images} image(s); FID needs at least 2")
    out = extract(inp, extractor, settings.max_pr_features, settings.seed, settings.progress, desc=name)
    return _Side(name, description, out.stats, out.features, out.logits)


def _sample_settings(description: dict) -> tuple[Any, Any]:
    return description.get("sampler_settings"), description.get("checkpoint_step")


def evaluate(samples: str, reference: str | None, settings: Settings) -> dict[str, Any]:
    """Scores ``samples`` against ``reference`` (paths/specs as the command takes them); returns the result dict.

    With ``reference=None`` only the statistics of ``samples`` are computed and written to ``settings.save_stats``
    (e.g. reference statistics of a dataset config for later runs).

    Raises:
      EvalInputError: for any input that cannot be scored, with a message that says why.
    """
    if reference is None and not settings.save_stats:
        raise EvalInputError("give --reference to score against, or --save_stats to only write the statistics")
    inp_a = sources.open_input(samples, settings.num_samples, settings.seed, settings.sampling)
    inp_b = None if reference is None else sources.open_input(reference, settings.num_reference, settings.seed,
                                                              settings.sampling)
    inputs = [i for i in (inp_a, inp_b) if i is not None]
    needs_model = not all(isinstance(i, (sources.StatsInput, sources.ActivationsInput)) for i in inputs)
    extractor = None
    if needs_model:
        variables = settings.variables() if callable(settings.variables) else settings.variables
        extractor = InceptionExtractor(variables, settings.mesh, settings.batch_size)
    a = _features_of("samples", inp_a, extractor, settings)
    if inp_b is None:
        _save(settings, a)
        return {"num_samples": a.stats.num_images, "samples": a.description, "saved_stats": settings.save_stats,
                "random_inception": settings.random_inception, "preprocessing": _preprocessing(settings),
                "warnings": [RANDOM_NOTE] if settings.random_inception else []}
    b = _features_of("reference", inp_b, extractor, settings)

    warnings = []
    if settings.random_inception:
        warnings.append(RANDOM_NOTE)
    for side in (a, b):
        n = side.stats.num_images
        if n is not None and n < NUM_FEATURES:
            warnings.append(
                f"{side.name} has N={n} < {NUM_FEATURES} feature dimensions: its covariance is singular and FID is "
                "biased upwards (compare FIDs only at equal N; 50,000 samples is the convention)"
            )
        recorded = (side.stats.meta or {}).get("resize")
        if recorded is not None and recorded != RESIZE:
            warnings.append(f"{side.name} statistics were computed with resize {recorded!r}, not lidiff's {RESIZE!r}")
    for w in warnings:
        logging.warning("%s", w)

    result: dict[str, Any] = {
        "fid": frechet_distance(a.stats.mu, a.stats.sigma, b.stats.mu, b.stats.sigma),
        "num_samples": a.stats.num_images,
        "num_reference": b.stats.num_images,
    }
    if a.features is not None and b.features is not None:
        p, r = feature_metrics.precision_recall(b.features, a.features, k=settings.pr_k)
        kid, kid_std = feature_metrics.kernel_inception_distance(
            a.features, b.features, settings.kid_subsets, settings.kid_subset_size, settings.seed
        )
        result.update(precision=p, recall=r, kid=kid, kid_std=kid_std)
    if a.logits is not None:
        if len(a.logits) >= settings.is_splits:
            result["inception_score"], result["inception_score_std"] = feature_metrics.inception_score(
                a.logits, settings.is_splits
            )
        else:
            warnings.append(f"Inception Score skipped: {len(a.logits)} samples < {settings.is_splits} splits")
    sampler, step = _sample_settings(a.description)
    result.update(
        random_inception=settings.random_inception,
        samples=a.description,
        reference=b.description,
        sampler_settings=sampler,
        checkpoint_step=step,
        preprocessing=_preprocessing(settings),
        settings={
            "precision_recall": {"k": settings.pr_k, "max_features_per_side": settings.max_pr_features},
            "kid": {"kernel": "(x.y/d+1)^3", "subsets": settings.kid_subsets, "subset_size": settings.kid_subset_size},
            "inception_score": {"splits": settings.is_splits, "logits": "unbiased (pool3 @ fc.kernel)"},
            "seed": settings.seed,
            "devices": extractor.mesh.devices.size if extractor else 0,
        },
        warnings=warnings,
    )
    if settings.save_stats:
        _save(settings, a)
        result["saved_stats"] = settings.save_stats
    return result


def _preprocessing(settings: Settings) -> dict[str, str]:
    return {
        "resize": RESIZE,
        "network": "FID InceptionV3 (TensorFlow 2015-12-05 graph, pytorch-fid port), pool3 2048-d",
        "weights": settings.weights,
        "input": "uint8 -> /255 -> resize -> 2x-1",
    }


def _save(settings: Settings, side: _Side) -> None:
    """Writes the side's mu/sigma (pytorch-fid format) with N and how they were made (``meta``)."""
    meta = {"source": side.description, "resize": RESIZE, "weights": settings.weights,
            "random_inception": settings.random_inception}
    save_stats(settings.save_stats, FeatureStats(side.stats.mu, side.stats.sigma, side.stats.num_images, meta))


def format_table(result: dict[str, Any], extra: list[str] = ()) -> list[str]:
    """The lines the command prints (then ``extra``); with random weights every line says so."""
    if "fid" not in result:  # statistics only
        lines = [f"wrote statistics of {result['num_samples']} images ({result['samples']['kind']}: "
                 f"{result['samples'].get('path')}) to {result['saved_stats']}",
                 f"{'resize':<18} {result['preprocessing']['resize']}",
                 f"{'weights':<18} {result['preprocessing']['weights']}", *extra]
        return [f"[RANDOM INCEPTION - not a real score] {line}" for line in lines] if result["random_inception"] \
            else lines
    rows = [("FID", result["fid"])]
    for key, label in (("precision", "precision (k=3)"), ("recall", "recall (k=3)"), ("kid", "KID"),
                       ("inception_score", "Inception Score")):
        if key in result:
            std = result.get(f"{key}_std")
            rows.append((label, f"{result[key]:.6g}" + (f" ± {std:.3g}" if std is not None else "")))
    lines = [f"{'metric':<18} value"]
    lines += [f"{name:<18} {value if isinstance(value, str) else f'{value:.6g}'}" for name, value in rows]
    lines.append(f"{'N samples':<18} {result['num_samples']}  ({result['samples']['kind']}: "
                 f"{result['samples'].get('path')})")
    lines.append(f"{'N reference':<18} {result['num_reference']}  ({result['reference']['kind']}: "
                 f"{result['reference'].get('path')})")
    lines.append(f"{'resize':<18} {result['preprocessing']['resize']}")
    lines.append(f"{'weights':<18} {result['preprocessing']['weights']}")
    if result.get("sampler_settings") or result.get("checkpoint_step") is not None:
        lines.append(f"{'sampler':<18} {result.get('sampler_settings')}  step {result.get('checkpoint_step')}")
    lines += [f"warning: {w}" for w in result["warnings"] if w != RANDOM_NOTE]
    lines += list(extra)
    if result["random_inception"]:
        lines = [f"[RANDOM INCEPTION - not a real score] {line}" for line in lines]
    return lines
