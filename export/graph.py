"""The served graph: uint8 photographs in; logits, probabilities, all Grad-CAM maps and an OOD score out.

:class:`CamModel` wraps a trained classifier so that the exported ONNX file needs nothing around it
but ONNX Runtime:

1. ``image`` arrives as uint8 ``[N, S, S, 3]`` RGB (a quarter of the bytes of float32 across PCIe),
   is moved to NCHW, cast to float and normalised with the model card's mean and std, by training's
   own :class:`train.augment.Normalizer` (one place for those constants: the card; one formula).
2. ``A = model.forward_features(x)`` is the activated final feature map ``[N, K, h, w]`` that feeds
   the global average pool (timm EfficientNet: the output of ``bn2``, a BatchNorm with SiLU).
3. ``logits = model.forward_head(A)``: global average pool and the linear classifier, exactly what
   ``model(x)`` computes.
4. ``cam = ReLU(Σ_k W_ck A_k)``: with global average pooling and one linear layer, the gradient of
   logit c with respect to A is ``W_c / (h·w)`` at every position, so Grad-CAM's channel weights are
   ``W_c / (h·w)`` and Grad-CAM is this map up to that positive constant, for all classes in one
   pass. It runs as a 1 x 1 convolution without bias, which every runtime executes fast. With
   ``card.output_stride == 16`` (dilated last stages, :func:`train.model.create_model`) ``A`` and the
   CAM are twice as fine (14 x 14 at 224 px); the head is unchanged, so the CAM is still Grad-CAM.
   With ``card.tta == "rot180"`` ``A`` is the mean of the photograph's map and its 180-degree
   turn's, turned back (:class:`train.model.TurnAveraged`, one batch of ``2N`` inside the graph),
   with ``card.cam_alignment == "receptive_field"`` paired by where the cells look, one cell more
   each way; pooling, head and CAM read that ``A``, so they stay exact.
5. ``ood_score`` (only when the card holds :class:`retinagate.card.OodStatistics`): the distance of
   the pooled ``A`` (the vector the classifier reads) from the training photographs', computed by
   training's own :class:`train.ood.OodScore`. Cards without statistics give the three-output graph
   exactly as before.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import nn

from retinagate.card import ModelCard
from train.augment import Normalizer
from train.model import served_model
from train.ood import OodScore

__all__ = ["INPUT_NAME", "OOD_OUTPUT_NAME", "OUTPUT_NAMES", "CamModel", "classifier_weight", "output_names"]

INPUT_NAME = "image"
#: The outputs every graph has, in this order.
OUTPUT_NAMES = ("logits", "probabilities", "cam")
#: The optional fourth output, present when the card holds OOD statistics.
OOD_OUTPUT_NAME = "ood_score"


def output_names(card: ModelCard) -> tuple[str, ...]:
    """The graph's outputs for ``card``, in order: :data:`OUTPUT_NAMES`, then ``ood_score`` if ``card.ood``."""
    return (*OUTPUT_NAMES, OOD_OUTPUT_NAME) if card.ood is not None else OUTPUT_NAMES


def classifier_weight(model: nn.Module) -> torch.Tensor:
    """The ``[C, K]`` weight of the model's final linear layer.

    Raises:
        ValueError: If the model has no single linear classifier after global average pooling (the
            only head for which the in-graph CAM is Grad-CAM).
    """
    get_classifier = getattr(model, "get_classifier", None)
    classifier = get_classifier() if callable(get_classifier) else getattr(model, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        raise ValueError(
            f"model: the classifier is {type(classifier).__name__}, expected one nn.Linear after global "
            "average pooling (the in-graph CAM equals Grad-CAM only for that head)"
        )
    pool = getattr(model, "global_pool", None)
    pool_type = getattr(pool, "pool_type", "avg")
    if pool_type != "avg":
        raise ValueError(f"model: global pooling is {pool_type!r}, expected 'avg' for an exact Grad-CAM")
    return classifier.weight


class CamModel(nn.Module):
    """A classifier with in-graph normalisation and class activation maps for every label.

    Args:
        model: A timm-style classifier with ``forward_features``/``forward_head``, average pooling and
            one linear classifier; served as the card says (:func:`train.model.served_model`) and
            switched to eval mode.
        card: Supplies the input size, mean and std, the number of labels (checked against the
            classifier) and, optionally, the OOD statistics (checked against the feature width).

    Raises:
        ValueError: If the head is not average pooling + linear, or its size disagrees with the card.
    """

    def __init__(self, model: nn.Module, card: ModelCard) -> None:
        super().__init__()
        weight = classifier_weight(model)
        if weight.shape[0] != card.num_labels:
            raise ValueError(
                f"model: the classifier has {weight.shape[0]} outputs but the card names {card.num_labels} labels"
            )
        self.model = served_model(model, card).eval()
        self.card = card
        # Training's own normaliser, so served and trained inputs agree to the last bit.
        self.normaliser = Normalizer(card.preprocessing)
        self.ood: OodScore | None = None
        if card.ood is not None:
            if card.ood.features != weight.shape[1]:
                raise ValueError(
                    f"ood.features: the statistics describe {card.ood.features} features but the classifier "
                    f"reads {weight.shape[1]}"
                )
            self.ood = OodScore(card.ood)
        self.output_names = output_names(card)

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, S, S, 3]`` RGB to the normalised float ``[N, 3, S, S]`` the classifier takes."""
        normalised: torch.Tensor = self.normaliser(image.permute(0, 3, 1, 2))
        return normalised

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """The final feature map ``A [N, K, h, w]`` (the Grad-CAM target layer) for uint8 NHWC input."""
        model: Any = self.model  # timm's forward_features/forward_head are not part of nn.Module's type
        features: torch.Tensor = model.forward_features(self.normalise(image))
        return features

    def head(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The graph's outputs (:attr:`output_names`) from the feature map ``A``."""
        model: Any = self.model
        logits: torch.Tensor = model.forward_head(features)
        weight = classifier_weight(self.model)
        cam = F.relu(F.conv2d(features, weight[:, :, None, None]))
        if self.ood is None:
            return logits, torch.sigmoid(logits), cam
        return logits, torch.sigmoid(logits), cam, self.ood(features.mean(dim=(2, 3)))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(logits [N, C], probabilities [N, C], cam [N, C, h, w])`` for uint8 NHWC input, then
        ``ood_score [N]`` when the card holds OOD statistics."""
        return self.head(self.features(image))
