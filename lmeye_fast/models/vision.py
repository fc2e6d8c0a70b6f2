"""Which output of the vision module each consumer reads, and its shape.

The static mapping and the IPN may read different outputs of one vision pass:
the patch tokens (``last_hidden_state``), the pooled class token
(``pooler_output``) or CLIP's projected image embedding (the pooled token
through ``visual_projection``, what ``CLIPModel.get_image_features`` and
``CLIPVisionModelWithProjection`` return). A module with both ``vision_model``
and ``visual_projection`` (``CLIPModel``, ``CLIPVisionModelWithProjection``)
runs its tower once and projects the pooled token itself, so one pass gives
all three.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from .config import VISION_FEATURES

__all__ = ["CLIPImageEncoder", "feature_shape", "vision_features", "read_image"]


class CLIPImageEncoder(nn.Module):
    """A ``CLIPModel``'s image side alone: its vision tower and visual projection (shared, not copied).

    The vision module of the published preset, so that freezing the vision module
    leaves the text tower (the interaction) as the user set it. Called on its own
    it returns the projected image embedding (B, P), as ``get_image_features``.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        tower, projection = getattr(clip, "vision_model", None), getattr(clip, "visual_projection", None)
        if not isinstance(tower, nn.Module) or not isinstance(projection, nn.Module):
            raise ValueError(f"clip: expected a CLIPModel with vision_model and visual_projection, got "
                             f"{type(clip).__name__}")
        self.vision_model, self.visual_projection = tower, projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


def _tower(vision: nn.Module) -> Tuple[nn.Module, Optional[nn.Module]]:
    """(the module that returns tokens and pooled output, CLIP's visual projection or None)."""
    projection = getattr(vision, "visual_projection", None)
    tower = getattr(vision, "vision_model", None)
    if isinstance(projection, nn.Module) and isinstance(tower, nn.Module):
        return tower, projection
    return vision, None


def feature_shape(vision: nn.Module, feature: str) -> Tuple[Optional[int], Optional[int]]:
    """(tokens per image, width) of ``feature`` of ``vision``; None where the module's config does not say."""
    if feature not in VISION_FEATURES:
        raise ValueError(f"feature: expected one of {VISION_FEATURES}, got {feature!r}")
    tower, projection = _tower(vision)
    config = getattr(tower, "config", None)
    hidden = getattr(config, "hidden_size", None)
    if feature == "projected":
        return 1, None if projection is None else projection.out_features
    if feature == "pooled":
        return 1, hidden
    size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if isinstance(size, int) and isinstance(patch, int):
        return (size // patch) ** 2 + 1, hidden  # the patches and the class token
    return None, hidden


def _as_tokens(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[:, None] if tensor.dim() == 2 else tensor


def vision_features(vision: nn.Module, pixel_values: torch.Tensor, features: Iterable[str]) -> Dict[str, torch.Tensor]:
    """One forward pass of ``vision``; each of ``features`` as (B, n, width)."""
    wanted = set(features)
    tower, projection = _tower(vision)
    out = tower(pixel_values)
    if isinstance(out, torch.Tensor):
        if len(wanted) > 1:
            raise ValueError(f"vision: the module returns one tensor, but the config asks for {sorted(wanted)}; "
                             "return an object with last_hidden_state / pooler_output, or pass image_features "
                             "and static_features")
        return {feature: _as_tokens(out) for feature in wanted}
    selected = {}
    for feature in wanted:
        if feature == "tokens":
            tensor = out.last_hidden_state
        elif feature == "pooled":
            tensor = out.pooler_output
        else:
            tensor = getattr(out, "image_embeds", None)
            if tensor is None:
                if projection is None:
                    raise ValueError("vision: 'projected' features need a CLIP model with a visual_projection "
                                     "(CLIPModel or CLIPVisionModelWithProjection)")
                tensor = projection(out.pooler_output)
        selected[feature] = _as_tokens(tensor)
    return selected


def read_image(image):
    """An image file (a path) or a PIL image as an 8-bit RGB PIL image, whatever its mode.

    Integer modes past 8 bits (``I;16*`` and ``I``, Pillow's modes of 16-bit PNG and TIFF) are
    scaled from 0..65535 and float images (``F``) from 0..1, where Pillow's ``convert("RGB")``
    would clip them to white; transparent pixels are laid over white, where ``convert`` keeps the
    colour hidden under them; the EXIF orientation is applied. A file that is missing, cannot be
    decoded, exceeds Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) or has a mode
    with no RGB form raises ``OSError`` naming it.
    """
    from pathlib import Path

    from PIL import Image, ImageOps

    if isinstance(image, Image.Image):
        return _as_rgb(ImageOps.exif_transpose(image), "image")
    if not isinstance(image, (str, Path)):
        raise TypeError(f"image: expected a path or a PIL image, got {type(image).__name__}")
    try:
        with Image.open(image) as file:
            file.load()
            return _as_rgb(ImageOps.exif_transpose(file), f"image {image}")
    except (OSError, Image.DecompressionBombError) as error:
        if str(error).startswith(f"image {image}"):
            raise
        raise OSError(f"image {image}: {error}") from error


def _as_rgb(picture, name: str):
    import numpy as np
    from PIL import Image

    mode = picture.mode
    if mode.startswith("I") or mode == "F":
        scale = 255.0 if mode == "F" else 255.0 / 65535.0
        grey = np.clip(np.rint(np.asarray(picture, dtype=np.float64) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in ("PA", "LA", "La", "RGBa") or (mode == "P" and "transparency" in picture.info):
        picture, mode = picture.convert("RGBA"), "RGBA"
    if mode == "RGBA":
        return Image.alpha_composite(Image.new("RGBA", picture.size, (255, 255, 255, 255)), picture).convert("RGB")
    try:
        return picture.convert("RGB")
    except ValueError as error:
        raise OSError(f"{name}: its mode {mode} has no RGB form ({error})") from None
