"""The classifier: timm's EfficientNet-B0 with one output per label.

Checkpoints are plain dictionaries saved with ``torch.save``::

    {"format": "retinagate-checkpoint/1", "model": state_dict, "card": card JSON,
     "config": resolved training config, "epoch": int, ...training state...}

``best.pt`` and ``last.pt`` share the format; :func:`load_checkpoint` reads either for evaluation and
export, as the card serves it (:func:`served_model`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import nn

from retinagate.card import ModelCard

__all__ = [
    "CHECKPOINT_FORMAT",
    "LesionProbe",
    "PretrainedUnavailableError",
    "TurnAveraged",
    "class_maps",
    "create_model",
    "load_checkpoint",
    "random_model",
    "served_model",
    "state_dict_sha256",
]

logger = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "retinagate-checkpoint/1"


class PretrainedUnavailableError(RuntimeError):
    """ImageNet weights could not be fetched (offline, hub unreachable, bad file)."""


def create_model(
    card: ModelCard,
    *,
    pretrained: bool = False,
    weights: Path | None = None,
    drop_rate: float = 0.2,
    drop_path_rate: float = 0.1,
) -> nn.Module:
    """Builds ``card.architecture`` with ``card.num_labels`` outputs and the card's output stride.

    With ``card.output_stride == 16`` the last stages are dilated instead of strided (timm's
    ``output_stride``): the same weights, a feature map and CAM twice as fine (14 x 14 at 224 px),
    still ending in average pooling and one linear layer, so the in-graph CAM stays exactly Grad-CAM.
    Stride 32 is timm's default and is not passed, so those models are built exactly as before.

    Args:
        card: Gives the architecture, the number of labels and the output stride.
        pretrained: Load ImageNet weights through timm's hub (needs network access or a warm cache).
        weights: A local timm checkpoint (ImageNet or otherwise) to start from; its classifier is
            replaced when its size differs. Implies pretrained initialisation from that file.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth rate.

    Raises:
        PretrainedUnavailableError: When pretrained weights cannot be loaded, naming the way out.
        FileNotFoundError: When ``weights`` does not exist.
    """
    kwargs: dict[str, Any] = {
        "num_classes": card.num_labels,
        "drop_rate": drop_rate,
        "drop_path_rate": drop_path_rate,
    }
    if card.output_stride != 32:
        kwargs["output_stride"] = card.output_stride
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"--weights: no such file: {weights}")
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
        pretrained = True
    try:
        return timm.create_model(card.architecture, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if not pretrained:
            raise
        source = f"the file {weights}" if weights is not None else "timm's model hub"
        raise PretrainedUnavailableError(
            f"could not load ImageNet weights for {card.architecture} from {source} ({type(exc).__name__}: "
            f"{exc}). Offline? Pass a local timm checkpoint with --weights PATH, or train from random "
            "initialisation with --no-pretrained."
        ) from exc


def class_maps(features: torch.Tensor, classifier: nn.Linear, *, bias: bool = False) -> torch.Tensor:
    """Every label's class map: ``W_c . A(x, y)`` at each cell of ``(N, K, h, w)`` features.

    Average pooling plus the linear head makes each logit the mean of its map plus the bias, so the
    map (with ReLU) is the exported CAM, and with ``bias`` it is what a pooling of the map other than
    the mean turns into a logit (:func:`train.losses.peak_logits`). Computed in the features' dtype.

    Returns:
        ``(N, C, h, w)`` maps.
    """
    maps = torch.einsum("nkhw,ck->nchw", features, classifier.weight.to(features.dtype))
    if bias and classifier.bias is not None:
        maps = maps + classifier.bias.to(features.dtype)[None, :, None, None]
    return maps


class LesionProbe(nn.Module):
    """A 1x1 convolution reading one stage of a timm network: each label's lesion map, for training only.

    The CAM is drawn from the last stage, 32 input pixels a cell, where a microaneurysm is a sliver of a
    cell and a few hundred photographs say little about where it is. The probe watches the stage at
    ``reduction`` (16: EfficientNet-B0's ``blocks.4``, 112 channels) through a forward hook and is
    asked by :func:`train.losses.lesion_cover_loss` where the lesions are, so the stages beneath the
    CAM learn to tell a lesion from its surroundings with dense targets (deep supervision). The probe
    is not part of the model: its weights are not in the model's state dict, the exported graph never
    sees it, and the CAM is still exactly Grad-CAM of what is served.

    Args:
        model: A timm network with ``feature_info``.
        classes: Labels to map.
        reduction: The stage's stride; the first stage at that stride is read.

    Raises:
        ValueError: If the network has no stage at that stride.
    """

    def __init__(self, model: nn.Module, classes: int, reduction: int = 16) -> None:
        super().__init__()
        stages = [info for info in getattr(model, "feature_info", []) if info["reduction"] == reduction]
        if not stages:
            raise ValueError(f"the network has no stage at stride {reduction} to probe")
        self.reduction = reduction
        self.head = nn.Conv2d(stages[0]["num_chs"], classes, kernel_size=1)
        self._seen: torch.Tensor | None = None
        # Not a submodule: the probe must not drag the network into its own state dict.
        self._handle = model.get_submodule(stages[0]["module"]).register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._seen = output

    def forward(self) -> torch.Tensor:
        """``(N, C, h, w)`` logits of the stage the network's last forward pass went through.

        Raises:
            RuntimeError: If the network has not run since the last call.
        """
        if self._seen is None:
            raise RuntimeError("the probed network has not run since the probe last read it")
        seen, self._seen = self._seen, None
        maps: torch.Tensor = self.head(seen.float())
        return maps

    def detach(self) -> None:
        """Stops watching the network."""
        self._handle.remove()


class TurnAveraged(nn.Module):
    """A classifier that looks at the photograph twice: as it is and turned 180 degrees.

    Its feature map averages the two views' maps, the turned one turned back. Aligned (the default
    for models trained since 2026-12-06, ``card.cam_alignment`` ``receptive_field``), each cell
    averages the two cells whose receptive fields are centred on the same place of the photograph.
    With symmetric padding the upright view's cell ``k`` is centred on input pixel ``s k`` (``s``
    the output stride) and the turned view's cell ``k``, turned back, on pixel ``s (k + 1) - 1``, so
    the upright cell ``k + 1`` pairs with the turned cell ``k``, and the map has one cell more each
    way (``[N, K, h + 1, w + 1]``; the outermost row and column hold one view each)::

        A(x) = r * (pad_after(F(x)) + pad_before(rot180(F(rot180(x))))) / 2,   r = (h+1)(w+1) / (h w)

    ``r`` makes the mean of ``A`` the mean of the two views' pooled features, so the logits are the
    mean of the two views' logits. Not aligned (older cards), ``A(x) = (F(x) + rot180(F(rot180(x))))
    / 2`` on the ``h x w`` grid, whose pairs lie a cell less a pixel apart on the photograph. Either
    way pooling and the linear head read ``A`` as they read ``F``, and ``ReLU(W . A)`` is exactly
    Grad-CAM of what is served (average pooling plus one linear layer over ``A``). Why two views:
    a network trained from random initialisation may put a label's evidence a fixed distance from
    the lesion in its own grid (measured: up to a cell below it); in the turned view that offset
    points the other way in the photograph, so the mean peaks nearer the lesion.

    The two views run as one batch of ``2N``. ``state_dict`` and ``load_state_dict`` are the
    wrapped model's, so checkpoints and weight hashes do not depend on the wrapper.
    """

    def __init__(self, model: nn.Module, *, aligned: bool = False) -> None:
        super().__init__()
        self.model = model
        self.aligned = aligned

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """``A(x)`` above for a normalised ``[N, 3, S, S]`` batch."""
        both = self.model.forward_features(torch.cat([images, images.flip(2, 3)]))  # type: ignore[operator]
        upright, turned = both.chunk(2)
        turned = turned.flip(2, 3)
        if not self.aligned:
            averaged: torch.Tensor = (upright + turned) / 2
            return averaged
        h, w = upright.shape[2], upright.shape[3]
        scale = (h + 1) * (w + 1) / (2 * h * w)
        aligned: torch.Tensor = (F.pad(upright, (0, 1, 0, 1)) + F.pad(turned, (1, 0, 1, 0))) * scale
        return aligned

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        head: torch.Tensor = self.model.forward_head(features, pre_logits=pre_logits)  # type: ignore[operator]
        return head

    def get_classifier(self) -> nn.Module:
        classifier: nn.Module = self.model.get_classifier()  # type: ignore[operator]
        return classifier

    @property
    def global_pool(self) -> nn.Module:
        pool: nn.Module = self.model.get_submodule("global_pool")
        return pool

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)


def served_model(model: nn.Module, card: ModelCard) -> nn.Module:
    """``model`` as ``card`` serves it: wrapped in :class:`TurnAveraged` when ``card.tta`` is
    ``rot180`` (once; an already wrapped model is returned as it is), otherwise itself."""
    if card.tta == "rot180" and not isinstance(model, TurnAveraged):
        return TurnAveraged(model, aligned=card.cam_alignment == "receptive_field")
    return model


def random_model(card: ModelCard, seed: int = 0) -> nn.Module:
    """The card's model with random weights and random batch-norm statistics, in eval mode.

    For tests and benchmarks: timm initialises EfficientNet so that the untrained feature map is ~1e-4
    everywhere; with the batch-norm scales and statistics drawn at random as well, logits and CAMs have
    ordinary magnitudes and numerical comparisons mean something. The same seed gives the same model.
    """
    torch.manual_seed(seed)
    model = create_model(card, drop_rate=0.0, drop_path_rate=0.0).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                mean, var = module.running_mean, module.running_var
                if mean is not None and var is not None:  # always so in EfficientNet (it tracks statistics)
                    mean.copy_(torch.randn(n, generator=generator) * 0.1)
                    var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A content hash of the weights, independent of pickling details."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        digest.update(key.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(
    path: Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelCard, dict[str, Any]]:
    """Reads a RetinaGate checkpoint and returns the model in eval mode, its card and the raw dict.

    The model is rebuilt from the card (:func:`create_model`), so its output stride is the one it was
    trained with; cards written before ``output_stride`` existed read as stride 32. It comes back as
    the card serves it (:func:`served_model`); cards written before ``tta`` existed read as ``none``.

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file is not a RetinaGate checkpoint (names what it found).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # weights_only keeps a checkpoint from running code on load; our format holds only plain data.
    raw = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path} is not a RetinaGate checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    card = ModelCard.from_json(raw["card"])
    model = create_model(card, drop_rate=0.0, drop_path_rate=0.0)
    model.load_state_dict(raw["model"])
    return served_model(model, card).eval(), card, raw
