"""Paired statistics of a drop: the base and the tuned model scored on the same rows.

Two models scored on the same suite are paired data: row i has an outcome before (the base)
and after (the tuned model), and the drop is the mean of the per-row differences
``d_i = 100 * (before_i - after_i)`` (points; positive = worse).  Everything here works on those
pairs, never on the two scores as if they were independent samples (that would double-count
the rows' own difficulty and give intervals several times too wide).

- :func:`bootstrap_interval` / :func:`paired_drop`: a percentile bootstrap over rows.  A
  resample draws n rows with replacement and keeps each row's before and after together, so
  its drop is the mean of n resampled ``d_i``.  That mean depends only on how many times each
  distinct value of ``d`` was drawn, so a resample is one multinomial draw of counts over the
  distinct values (for 0/1 scores: -100, 0, +100): the same distribution as drawing row
  indices, at a fraction of the cost.  Seeded (``numpy.random.Generator(PCG64(seed))``),
  ``DEFAULT_RESAMPLES`` = 10,000 resamples, interval = the 2.5th and 97.5th percentiles
  (``numpy.quantile``, linear interpolation).
- :func:`mean_drop_interval`: the same for the mean of the per-category drops, with the
  category structure kept (each category's rows are resampled within the category, and the
  resample's mean is the plain mean of the resampled category drops).
- :func:`ratio_interval`: the same bootstrap for one model's score as a share of another's.
- :func:`mcnemar_exact_p`: the exact two-sided McNemar test for 0/1 scores: of the discordant
  rows (b = right before and wrong after, c = wrong before and right after), b ~ Binomial(b + c,
  1/2) under "no change"; ``p = min(1, 2 * P(X <= min(b, c)))``.  None for other scores.
- :func:`min_detectable_drop`: the smallest drop a category of n rows can detect with 80% power
  at two-sided alpha 0.05, at the base's score p0 (points; formula in its docstring).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
CONFIDENCE = 0.95
ALPHA = 0.05  # two-sided, for McNemar and the detectable drop
POWER = 0.80
# Resampled means held at once per category: bounds memory when the scores are continuous (one
# distinct value per row) without slowing the usual 0/1 case (three distinct values).
_CELLS_PER_BLOCK = 4_000_000


@dataclass
class PairedDrop:
    """One category's (or the mean's) drop with its paired statistics; points throughout."""
    n_pairs: int
    drop: float  # mean of 100 * (before - after)
    ci95: list[float]  # [low, high], percentile bootstrap
    mcnemar_p: float | None  # exact, 0/1 scores only
    min_detectable_drop: float | None


def _as_pairs(before: Sequence[float], after: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(before, dtype=np.float64)
    a = np.asarray(after, dtype=np.float64)
    if b.ndim != 1 or b.shape != a.shape:
        raise ValueError(f"before and after must be two equally long lists of row outcomes, got {b.shape} and {a.shape}")
    if b.size == 0:
        raise ValueError("no paired rows")
    if not (np.isfinite(b).all() and np.isfinite(a).all()):
        raise ValueError("row outcomes must be finite numbers")
    return b, a


def is_binary(values: np.ndarray) -> bool:
    return bool(np.isin(values, (0.0, 1.0)).all())


def _resampled_means(diffs: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``resamples`` bootstrap means of ``diffs`` (rows drawn with replacement, n of n)."""
    values, counts = np.unique(diffs, return_counts=True)
    n = diffs.size
    if values.size == 1:  # every resample is the one value; no draw, so no rounding either
        return np.full(resamples, values[0])
    probabilities = counts / n
    block = max(1, _CELLS_PER_BLOCK // values.size)
    means = np.empty(resamples)
    for start in range(0, resamples, block):
        stop = min(resamples, start + block)
        drawn = rng.multinomial(n, probabilities, size=stop - start)  # (block, distinct values)
        means[start:stop] = drawn @ values / n
    return means


def _percentiles(means: np.ndarray, confidence: float) -> list[float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return [float(low), float(high)]


def bootstrap_interval(before: Sequence[float], after: Sequence[float], resamples: int = DEFAULT_RESAMPLES,
                       seed: int = DEFAULT_SEED, confidence: float = CONFIDENCE) -> list[float]:
    """Percentile-bootstrap interval of the drop ``mean(100 * (before - after))``, points.

    ``before[i]`` and ``after[i]`` are the two models' outcomes on row i (1 = right, 0 = wrong,
    or a score in [0, 1]); they are resampled together.  Same inputs and seed, same bounds.
    """
    b, a = _as_pairs(before, after)
    _check_resampling(resamples, confidence)
    rng = np.random.Generator(np.random.PCG64(seed))
    return _percentiles(_resampled_means(100.0 * (b - a), resamples, rng), confidence)


def mean_drop_interval(pairs: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                       resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                       confidence: float = CONFIDENCE) -> list[float]:
    """Interval of the mean over categories of the per-category drops (points).

    ``pairs``: category -> (before outcomes, after outcomes).  Each resample redraws every
    category's rows within that category (n_c of n_c, pairs kept together) and averages the
    resampled category drops with equal weight, as ``mean_forgetting`` does.  Categories are
    drawn in sorted order from one seeded generator.
    """
    if not pairs:
        raise ValueError("no categories")
    _check_resampling(resamples, confidence)
    rng = np.random.Generator(np.random.PCG64(seed))
    total = np.zeros(resamples)
    for name in sorted(pairs):
        b, a = _as_pairs(*pairs[name])
        total += _resampled_means(100.0 * (b - a), resamples, rng)
    return _percentiles(total / len(pairs), confidence)


def ratio_interval(reference: Sequence[float], candidate: Sequence[float], resamples: int = DEFAULT_RESAMPLES,
                   seed: int = DEFAULT_SEED, confidence: float = CONFIDENCE) -> list[float]:
    """Percentile-bootstrap interval of ``sum(candidate) / sum(reference)``: one model's task score
    as a share of another's, both scored on the same rows (issue 24's "95% of plain LoRA's task
    score" asked with the same care as the gate).

    Rows are resampled with their two outcomes together.  As in :func:`_resampled_means`, a
    resample only depends on how often each distinct (reference, candidate) pair was drawn, so it
    is one multinomial draw over those pairs.  Resamples whose reference sum is 0 have no ratio
    and are left out of the percentiles.
    """
    ref, cand = _as_pairs(reference, candidate)
    _check_resampling(resamples, confidence)
    if not ref.sum() > 0:
        raise ValueError("the reference scores 0 on these rows: a share of it is undefined")
    pairs, counts = np.unique(np.stack([ref, cand], axis=1), axis=0, return_counts=True)
    rng = np.random.Generator(np.random.PCG64(seed))
    drawn = rng.multinomial(ref.size, counts / ref.size, size=resamples)  # (resamples, distinct pairs)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (drawn @ pairs[:, 1]) / (drawn @ pairs[:, 0])
    return _percentiles(ratios[np.isfinite(ratios)], confidence)


def _check_resampling(resamples: int, confidence: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def score_interval(outcomes: Sequence[float], resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                   confidence: float = CONFIDENCE) -> list[float]:
    """Percentile-bootstrap interval of one model's score ``mean(100 * outcome)`` (points): the
    table of a report without a baseline.  The same resampling as :func:`bootstrap_interval`."""
    values = np.asarray(outcomes, dtype=np.float64)
    return [0.0 - bound for bound in reversed(bootstrap_interval(np.zeros_like(values), values, resamples, seed,
                                                            confidence))]


def mcnemar_p_from_counts(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts (b lost, c gained).

    Under no change each discordant row is a loss with probability 1/2, so b ~ Binomial(b + c, 1/2);
    ``p = min(1, 2 * sum_{i <= min(b, c)} C(b + c, i) / 2^(b + c))``; no discordant row: p = 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))  # exact integers: no underflow at large n
    return min(1.0, 2.0 * tail / 2 ** n)


def mcnemar_exact_p(before: Sequence[float], after: Sequence[float]) -> float | None:
    """The exact McNemar p-value of paired 0/1 outcomes; None when a score is not 0 or 1."""
    b, a = _as_pairs(before, after)
    if not (is_binary(b) and is_binary(a)):
        return None
    lost = int(np.sum((b == 1.0) & (a == 0.0)))
    gained = int(np.sum((b == 0.0) & (a == 1.0)))
    return mcnemar_p_from_counts(lost, gained)


def _smallest_significant_loss(alpha: float) -> int:
    """Fewest discordant rows, all of them losses, that exact McNemar calls significant (6 at 0.05)."""
    k = 1
    while mcnemar_p_from_counts(k, 0) > alpha:
        k += 1
    return k


def min_detectable_drop(n: int, base_score: float, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """Smallest drop (points) a category of ``n`` rows detects with ``power`` at two-sided ``alpha``,
    when the base scores ``base_score`` points on it.  None for n = 0.

    The larger of two terms:

    1. the one-sample binomial normal approximation at the base score p0 = base_score / 100:
       ``(z_{1 - alpha/2} + z_{power}) * sqrt(p0 (1 - p0) / n) * 100`` (z: standard normal
       quantiles, 1.960 + 0.842 = 2.802 at the defaults).  The tuned model's score on n rows
       has a sampling error of about sqrt(p0 (1 - p0) / n) around its true value; the base's
       outcomes are taken as given, since both models answer the same rows.
    2. a floor that holds whatever the scores: no drop of fewer than k rows can be significant,
       where k is the smallest number of discordant rows, all of them losses, with an exact
       McNemar p <= alpha (k = 6 at alpha 0.05: 2 * 0.5^6 = 0.031, 2 * 0.5^5 = 0.0625); the
       floor is ``100 * k / n``.  It matters when p0 is near 0 or 100, where term 1 goes to 0.

    Term 1 assumes the tuned model's row outcomes vary about as much as independent draws at
    p0; a tuned model that agrees with the base on most rows gives a tighter paired interval,
    so this is what the suite can be relied on to see, not the best case.  At p0 = 50: about 28
    points for 24 rows, 9.9 for 200, 6.3 for 500.  A value above the base score itself means no
    loss in that category can be detected at all.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return None
    if not 0.0 <= base_score <= 100.0:
        raise ValueError(f"base_score must be in [0, 100] points, got {base_score}")
    normal = NormalDist()
    z = normal.inv_cdf(1.0 - alpha / 2.0) + normal.inv_cdf(power)
    p0 = base_score / 100.0
    binomial = z * math.sqrt(p0 * (1.0 - p0) / n) * 100.0
    floor = 100.0 * _smallest_significant_loss(alpha) / n
    return max(binomial, floor)


def mean_min_detectable_drop(sizes_and_scores: Sequence[tuple[int, float]], alpha: float = ALPHA,
                             power: float = POWER) -> float | None:
    """The detectable drop of the mean over C categories (points): term 1 of
    :func:`min_detectable_drop` with the variance of a mean of independent category scores,
    ``(z_{1 - alpha/2} + z_{power}) * sqrt(sum_c p_c (1 - p_c) / n_c) / C * 100``, floored by the
    smallest per-category floor divided by C (one category losing its k rows)."""
    cells = [(n, s) for n, s in sizes_and_scores if n > 0]
    if not cells:
        return None
    normal = NormalDist()
    z = normal.inv_cdf(1.0 - alpha / 2.0) + normal.inv_cdf(power)
    variance = sum((s / 100.0) * (1.0 - s / 100.0) / n for n, s in cells)
    binomial = z * math.sqrt(variance) / len(cells) * 100.0
    floor = 100.0 * _smallest_significant_loss(alpha) / max(n for n, _ in cells) / len(cells)
    return max(binomial, floor)


def paired_drop(before: Sequence[float], after: Sequence[float], resamples: int = DEFAULT_RESAMPLES,
                seed: int = DEFAULT_SEED) -> PairedDrop:
    """All of one category's statistics from its paired row outcomes."""
    b, a = _as_pairs(before, after)
    return PairedDrop(n_pairs=int(b.size), drop=float(100.0 * np.mean(b - a)),
                      ci95=bootstrap_interval(b, a, resamples, seed), mcnemar_p=mcnemar_exact_p(b, a),
                      min_detectable_drop=min_detectable_drop(int(b.size), float(100.0 * np.mean(b))))
