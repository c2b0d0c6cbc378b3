"""How far a photograph lies from the training photographs, in the classifier's own feature space.

The served graph's optional ``ood_score [N]`` output (see :class:`OodScore`) measures the distance of
the globally average-pooled final features ``f`` (the vector the linear classifier reads) from the
training distribution, under the probabilistic-PCA model of that distribution (Tipping & Bishop,
1999): the mean ``mu``, the top ``rank`` principal directions ``C`` (rows, orthonormal) with their
variances ``var``, and one variance ``sigma2`` shared by the ``K - rank`` directions left over. The
covariance of that model is ``C^T diag(var) C + sigma2 (I - C^T C)``; the squared Mahalanobis distance
under it is::

    z   = C (f - mu)                          # coordinates in the principal subspace
    r   = (f - mu) - C^T z                    # what the subspace does not explain
    d2  = sum(z**2 / var) + ||r||**2 / sigma2
    ood_score = sqrt(d2 / K)

``d2`` averages ``K`` over the training photographs (``rank`` from the subspace, ``K - rank`` from the
residual), so ``ood_score`` is an RMS distance in standard deviations per feature: about 1 for a
typical training photograph, more for photographs unlike them (noise, a flat frame, an
external-eye photograph, a different camera). The residual is computed explicitly rather than as
``||f - mu||**2 - ||z||**2``: in float32 that difference cancels catastrophically when the residual is
small.

:func:`fit_ood_statistics` fits ``mu``, ``C``, ``var`` and ``sigma2`` on training photographs and
chooses the threshold on validation photographs; :func:`ood_images_from_config` finds both splits
from a checkpoint's training config. :func:`gate_limits_from_config` fits the other side of "like the
training photographs", the gradability gate's image-quality limits (:func:`retinagate.gate.fit_limits`),
on the same training photographs as they were decoded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from retinagate.card import GateLimits, ModelCard, OodStatistics
from train.augment import Normalizer
from train.model import served_model

if TYPE_CHECKING:
    from train.datasets import Split, SplitSource

__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_QUANTILE",
    "DEFAULT_RANK",
    "OodImages",
    "OodScore",
    "fit_ood_statistics",
    "gate_limits_from_config",
    "ood_images_from_config",
    "pooled_features",
]

logger = logging.getLogger(__name__)

#: Principal directions kept. Beyond the first few dozen the training features' spectrum is flat
#: enough for one shared residual variance, and every direction kept costs ``K`` numbers in the card.
DEFAULT_RANK = 16
#: Quantile of the validation photographs' scores that the threshold starts from ...
DEFAULT_QUANTILE = 0.99
#: ... and the factor above it (see :func:`fit_ood_statistics`).
DEFAULT_MARGIN = 1.25
#: Fewest photographs the statistics are fitted and calibrated on.
MIN_TRAIN_IMAGES = 8
MIN_VAL_IMAGES = 5


class OodScore(nn.Module):
    """``ood_score [N]`` from pooled features ``[N, K]``: the formula of the module docstring.

    The served graph (:class:`export.graph.CamModel`) and the threshold fit
    (:func:`fit_ood_statistics`) both run this module, so the score that is calibrated is the score
    that is served. The statistics become buffers in the card's values (float32 in the graph; a
    ``.double()`` copy runs the same constants in float64).
    """

    mean: torch.Tensor
    components: torch.Tensor
    inverse_std: torch.Tensor
    inverse_residual_std: torch.Tensor

    def __init__(self, statistics: OodStatistics) -> None:
        super().__init__()
        self.features = statistics.features
        self.register_buffer("mean", torch.tensor(statistics.mean, dtype=torch.float32))
        self.register_buffer("components", torch.tensor(statistics.components, dtype=torch.float32))
        variances = torch.tensor(statistics.variances, dtype=torch.float64)
        self.register_buffer("inverse_std", variances.rsqrt().float())
        residual = torch.tensor(statistics.residual_variance, dtype=torch.float64)
        self.register_buffer("inverse_residual_std", residual.rsqrt().float())

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        centred = pooled - self.mean
        z = centred @ self.components.T
        residual = centred - z @ self.components
        d2 = (z * self.inverse_std).square().sum(dim=1) + (residual * self.inverse_residual_std).square().sum(dim=1)
        return torch.sqrt(d2 / self.features)


def _check_images(images: NDArray[np.uint8], card: ModelCard, name: str) -> None:
    size = card.input_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
        raise ValueError(
            f"{name}: expected uint8 [N, {size}, {size}, 3] photographs prepared with the card's recipe, "
            f"got {images.dtype} {list(images.shape)}"
        )


def pooled_features(
    model: nn.Module, card: ModelCard, images: NDArray[np.uint8], *, batch_size: int = 32, progress: bool = False
) -> NDArray[np.float64]:
    """The globally average-pooled final features ``[N, K]`` of prepared photographs, as float64.

    The photographs go through training's :class:`train.augment.Normalizer` and the features of the
    model as the card serves it (:func:`train.model.served_model`: both views averaged under
    ``tta`` rot180), as in the served graph; the model runs on the device of its weights.
    """
    from tqdm import tqdm

    _check_images(images, card, "images")
    device = next(model.parameters()).device
    normaliser = Normalizer(card.preprocessing).to(device)
    timm_model: Any = served_model(model, card).eval()  # timm's forward_features is not nn.Module's type
    pooled = []
    with torch.inference_mode():
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="ood features", unit="batch", disable=not progress, leave=False):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
            features = timm_model.forward_features(normaliser(batch.permute(0, 3, 1, 2)))
            pooled.append(features.float().mean(dim=(2, 3)).double().cpu().numpy())
    return np.concatenate(pooled) if pooled else np.zeros((0, 0))


def _significant(values: NDArray[np.float64]) -> tuple[float, ...]:
    """Seven significant digits (float32's precision): the card stays about half the size."""
    return tuple(float(f"{v:.7g}") for v in values.tolist())


def fit_ood_statistics(
    model: nn.Module,
    card: ModelCard,
    train_images: NDArray[np.uint8],
    val_images: NDArray[np.uint8],
    *,
    rank: int = DEFAULT_RANK,
    batch_size: int = 32,
    quantile: float = DEFAULT_QUANTILE,
    margin: float = DEFAULT_MARGIN,
    fitted_on: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> OodStatistics:
    """Fits the statistics behind ``ood_score`` and chooses its threshold.

    Mean, principal directions and variances come from the training photographs' pooled features
    (:func:`pooled_features`). ``rank`` is capped at ``(N - 1) // 2`` for ``N`` training photographs,
    so that at least as many sample directions as are kept inform the residual variance (its
    maximum-likelihood estimate: the mean of the remaining eigenvalues over the ``K - rank``
    directions).

    The threshold is ``margin`` times the ``quantile`` of the *validation* photographs' scores. Not
    the training photographs': the statistics were fitted to those, so their scores run low (their
    residual is partly fitted away), while a held-out photograph scores what a new in-distribution
    image scores. At most ``1 - quantile`` (1 %) of the validation photographs lie above the
    quantile, fewer above the threshold; the margin (1.25) leaves room for the sampling error of a
    tail quantile estimated from a few hundred photographs and for the small drift of a new camera
    of the same kind, because a photograph wrongly called out of distribution is withheld from
    readers, while the inputs the score is for (noise, blank or non-fundus frames, foreign devices)
    score several times the threshold. The fraction of validation photographs above it is recorded
    in ``fitted_on``.

    Args:
        model: The trained classifier (eval mode is set).
        card: Supplies the input size and normalisation.
        train_images: uint8 ``[N, S, S, 3]`` training photographs, prepared with the card's recipe
            (:func:`retinagate.preprocess.prepare`), as serving prepares them.
        val_images: Validation photographs, prepared the same way.
        rank: Principal directions to keep (at most).
        batch_size: Photographs per forward pass.
        quantile: Validation quantile the threshold starts from, in (0.5, 1].
        margin: Factor above that quantile, at least 1.
        fitted_on: Provenance recorded in the statistics (origin of the photographs, ...).
        progress: Show a progress bar on stderr while features are computed.

    Raises:
        ValueError: Too few photographs, the wrong shape, parameters out of range, or features that
            do not vary at all.
    """
    if rank < 1:
        raise ValueError(f"rank: {rank}; expected at least 1")
    if not 0.5 < quantile <= 1.0:
        raise ValueError(f"quantile: {quantile}; expected in (0.5, 1]")
    if margin < 1.0:
        raise ValueError(f"margin: {margin}; expected at least 1")
    _check_images(train_images, card, "train_images")
    _check_images(val_images, card, "val_images")
    if len(train_images) < MIN_TRAIN_IMAGES:
        raise ValueError(f"train_images: {len(train_images)} photographs; need at least {MIN_TRAIN_IMAGES}")
    if len(val_images) < MIN_VAL_IMAGES:
        raise ValueError(f"val_images: {len(val_images)} photographs; need at least {MIN_VAL_IMAGES}")

    train = pooled_features(model, card, train_images, batch_size=batch_size, progress=progress)
    n, k = train.shape
    mean = train.mean(axis=0)
    _, singular, directions = np.linalg.svd(train - mean, full_matrices=False)
    eigenvalues = singular**2 / (n - 1)
    total = float(eigenvalues.sum())
    if not total > 1e-10 * float((train**2).sum(axis=1).mean()):  # identical up to rounding
        raise ValueError("train_images: the photographs' features do not vary; fit on varied training photographs")
    kept = max(1, min(rank, (n - 1) // 2, k - 1))
    # Floors keep the whitening finite (and fp32 errors small) when a direction barely varies.
    floor = 1e-6 * total / k
    statistics = OodStatistics(
        features=k,
        rank=kept,
        mean=_significant(mean),
        components=tuple(_significant(row) for row in directions[:kept]),
        variances=_significant(np.maximum(eigenvalues[:kept], floor)),
        residual_variance=float(f"{max(float(eigenvalues[kept:].sum()) / (k - kept), floor):.7g}"),
        threshold=1.0,  # placeholder until the validation scores are known
    )
    score = OodScore(statistics).double()
    with torch.no_grad():
        train_scores = score(torch.from_numpy(train)).numpy()
        val = pooled_features(model, card, val_images, batch_size=batch_size, progress=progress)
        val_scores = score(torch.from_numpy(val)).numpy()
    threshold = margin * float(np.quantile(val_scores, quantile))
    summary = {
        **(dict(fitted_on) if fitted_on is not None else {}),
        "train_images": n,
        "val_images": len(val_images),
        "quantile": quantile,
        "margin": margin,
        "train_score_median": round(float(np.median(train_scores)), 4),
        "val_score_median": round(float(np.median(val_scores)), 4),
        "val_score_quantile": round(float(np.quantile(val_scores, quantile)), 4),
        "val_above_threshold": round(float((val_scores > threshold).mean()), 4),
    }
    logger.info(
        "ood statistics: rank %d of %d features from %d training photographs; threshold %.3f "
        "(validation median %.3f, %.1f%% above)",
        kept, k, n, threshold, summary["val_score_median"], 100 * summary["val_above_threshold"],
    )  # fmt: skip
    return statistics.model_copy(update={"threshold": float(f"{threshold:.7g}"), "fitted_on": summary})


@dataclass(frozen=True)
class OodImages:
    """Prepared training and validation photographs to fit :class:`OodStatistics` on."""

    train: NDArray[np.uint8]  # [N, S, S, 3]
    val: NDArray[np.uint8]  # [M, S, S, 3]
    origin: str  # where the splits came from, for the card


def ood_images_from_config(
    card: ModelCard,
    config: Mapping[str, Any],
    *,
    train_limit: int = 600,
    val_limit: int = 400,
) -> OodImages | None:
    """The training and validation photographs named by a checkpoint's training config, prepared for ``card``.

    The splits are found as training found them (:func:`train.datasets.load_splits` with the config's
    data, seed and fractions). Where the run's cache folder is still on this machine, the photographs
    come from training's preprocessing cache (:func:`train.datasets.cache_split`, which builds the
    card's entry there if it is missing, as evaluation does); otherwise the selected files are decoded
    and prepared with :func:`retinagate.preprocess.prepare`, and nothing is written. At most
    ``train_limit`` / ``val_limit`` photographs are used, evenly spaced over each split, so the same
    data always gives the same statistics.

    Returns:
        The photographs, or ``None`` when the config names no data or the data is not on this machine.

    Raises:
        ValueError: If the data is here but unusable (:class:`train.datasets.DataSourceError`), a
            split is empty, or the card's labels are not the scheme the data readers map to.
    """
    from retinagate.labels import LABELS
    from retinagate.preprocess import prepare
    from train.datasets import cache_split, evenly_spaced, read_image

    found = _splits_from_config(config)
    if found is None:
        return None
    if card.labels != LABELS:
        raise ValueError("the card's labels are not the 29-label RFMiD scheme the data readers map to")
    splits, cache_dir = found
    data = config.get("data") or config.get("labels_csv")
    prepared: dict[str, NDArray[np.uint8]] = {}
    wanted: tuple[tuple[Split, int], ...] = (("train", train_limit), ("val", val_limit))
    for name, limit in wanted:
        source = splits.get(name)
        if source is None or len(source) == 0:
            raise ValueError(f"the {name} split of {data} is empty")
        picks = evenly_spaced(len(source), limit)
        if cache_dir is not None and cache_dir.is_dir():
            cached = cache_split(source, card.preprocessing, cache_dir, progress=False)
            prepared[name] = np.ascontiguousarray(cached.images[picks])
        else:
            prepared[name] = np.stack([prepare(read_image(source.paths[i]), card.preprocessing) for i in picks])
    return OodImages(train=prepared["train"], val=prepared["val"], origin=splits["train"].origin)


def gate_limits_from_config(
    card: ModelCard, config: Mapping[str, Any], *, limit: int = 600, workers: int = 0
) -> GateLimits | None:
    """The gradability gate's limits fitted to the training photographs a checkpoint's config names.

    At most ``limit`` photographs, evenly spaced over the training split, are decoded and assessed
    with the default limits (:func:`retinagate.gate.assess`, the card's FOV threshold), on
    ``workers`` threads (0: one per CPU core); :func:`retinagate.gate.fit_limits` fits the limits. The
    photographs the defaults flagged are assessed again under the fitted limits, and ``fitted_on``
    adds how many are still flagged and why (``still_flagged``, ``still_reasons``): what fitting
    cannot cure, such as a field of view the gate's rules do not find.

    Returns:
        The limits, or ``None`` when the config names no data or the data is not on this machine.

    Raises:
        ValueError: If the data is here but unusable, or the training split is empty.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    from retinagate import gate
    from train.datasets import evenly_spaced, read_image

    found = _splits_from_config(config)
    if found is None:
        return None
    source = found[0].get("train")
    if source is None or len(source) == 0:
        raise ValueError(f"the train split of {config.get('data') or config.get('labels_csv')} is empty")

    def assess(i: int, limits: GateLimits | None = None) -> gate.Verdict:
        return gate.assess(read_image(source.paths[i]), threshold=card.preprocessing.fov_threshold, limits=limits)

    picks = evenly_spaced(len(source), limit)
    with ThreadPoolExecutor(max_workers=workers if workers > 0 else (os.cpu_count() or 1)) as pool:
        verdicts = list(pool.map(assess, picks))
        fitted = gate.fit_limits(verdicts)
        # What fitting could not cure (no field of view the gate's rules find, say): those flagged
        # by the defaults, assessed again under the fitted limits.
        flagged = [int(i) for i, v in zip(picks, verdicts, strict=True) if not v.gradable]
        again = list(pool.map(lambda i: assess(i, fitted), flagged))
    fitted_on = {
        **fitted.fitted_on,
        "still_flagged": sum(not v.gradable for v in again),
        "still_reasons": gate.count_reasons(again),
    }
    return fitted.model_copy(update={"fitted_on": fitted_on})


def _splits_from_config(config: Mapping[str, Any]) -> tuple[dict[Split, SplitSource], Path | None] | None:
    """The splits a checkpoint's training config names, found as training found them, and the run's
    cache folder; ``None`` when the config names no data or the data is not on this machine.

    Raises:
        ValueError: If the data is here but unusable (:class:`train.datasets.DataSourceError`).
    """
    from train.datasets import load_splits

    data, labels_csv, images = (config.get(key) for key in ("data", "labels_csv", "images"))
    if data is None and labels_csv is None:
        return None
    if not all(Path(p).exists() for p in (data, labels_csv, images) if p is not None):
        return None
    cache_dir, skip = _run_folders(config)
    splits = load_splits(
        data=Path(data) if data is not None else None,
        labels_csv=Path(labels_csv) if labels_csv is not None else None,
        images=Path(images) if images is not None else None,
        seed=int(config.get("seed", 0)),
        val_fraction=float(config.get("val_fraction", 0.2)),
        test_fraction=float(config.get("test_fraction", 0.0)),
        skip=skip,
    )
    return splits, cache_dir


def _run_folders(config: Mapping[str, Any]) -> tuple[Path | None, list[Path]]:
    """The run's preprocessing cache folder and the folders training skipped when it searched the data."""
    from train.loop import TrainConfig

    try:
        run = TrainConfig.from_dict(dict(config))
    except (TypeError, ValueError, KeyError):  # a config from an older or foreign run: no cache, no skips
        return None, []
    return run.resolved_cache_dir, [run.resolved_cache_dir, run.out]
