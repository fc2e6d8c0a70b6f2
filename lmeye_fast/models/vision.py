"""Which output of the vision module each consumer reads, and its shape.

The static mapping and the IPN may read different outputs of one vision pass:
the patch tokens (``last_hidden_state``), the pooled class token
(``pooler_output``) or CLIP's projected image embedding (the pooled token
through ``visual_projection``, what ``CLIPModel.get_image_features`` and
``CLIPVisionModelWithProjection`` return). A module with both ``vision_model``
and ``visual_projection`` (``CLIPModel``, ``CLIPVisionModelWithProjection``)
runs its tower once and projects the pooled token itself, so one pass gives
all three.

``read_image`` is the one way an image file becomes the RGB picture an image processor
reads, and ``load_vision`` the one way a vision checkpoint becomes the module a config's
features need; training, evaluation and the lmms-eval model share both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from .config import VISION_FEATURES
from .sources import Source, source_of

__all__ = ["CLIPImageEncoder", "feature_shape", "vision_features", "read_image", "vision_class", "load_vision"]

_CLIP_KINDS = ("clip", "clip_vision_model")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_BACKGROUND = (255, 255, 255)


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

        self.source = source_of(clip)  # where the CLIPModel came from, for the adapter's record

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

    Pillow's own ``convert("RGB")`` clips integer images to 255 and floats to their integer
    part, and keeps the hidden colour of transparent pixels; here 16-bit images (``I;16*``,
    and ``I``, which Pillow uses for 16-bit PNG and TIFF files) are scaled from 0..65535,
    float images (``F``) from 0..1, and transparent pixels are composited over white. Orientation
    follows the file's EXIF tag. A file that is missing, cannot be decoded, exceeds Pillow's
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) or has a mode Pillow cannot convert raises
    ``OSError`` naming it.
    """
    from PIL import Image, ImageOps

    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as file:
                file.load()
                picture = file
        except (OSError, Image.DecompressionBombError) as error:
            raise OSError(f"image {image}: {error}") from error
        name = str(image)
    elif isinstance(image, Image.Image):
        picture, name = image, "image"
    else:
        raise TypeError(f"image: expected a path or a PIL image, got {type(image).__name__}")
    picture = ImageOps.exif_transpose(picture)
    mode = picture.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        import numpy as np

        values = np.asarray(picture, dtype=np.float64)
        scale = 255.0 if mode == "F" else 255.0 / 65535.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "RGB":
        return picture
    try:
        if mode == "La":  # grey premultiplied by alpha, which Pillow converts to nothing: over white by hand
            import numpy as np

            grey, alpha = (np.asarray(band, dtype=np.int32) for band in picture.split())
            return Image.fromarray(np.clip(grey + 255 - alpha, 0, 255).astype(np.uint8), mode="L").convert("RGB")
        if "A" in picture.getbands() or "a" in mode or "transparency" in picture.info:
            rgba = picture.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, _BACKGROUND + (255,)), rgba).convert("RGB")
        return picture.convert("RGB")
    except ValueError as error:  # Pillow's "conversion from X to Y not supported"
        raise OSError(f"{name}: Pillow cannot convert its mode {mode} to RGB ({error})") from error


def vision_class(features: Iterable[str], with_text: bool = False) -> str:
    """The class a CLIP checkpoint loads as for ``features``: ``CLIPModel`` when the text tower is
    needed too (the CLIP text interaction), ``CLIPVisionModelWithProjection`` for projected
    features, else ``CLIPVisionModel``."""
    if with_text:
        return "CLIPModel"
    return "CLIPVisionModelWithProjection" if "projected" in set(features) else "CLIPVisionModel"


def load_vision(name: str, features: Iterable[str] = ("tokens",), with_text: bool = False,
                revision: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load the vision checkpoint ``name`` (a hub name or a directory) as the module ``features`` need.

    A CLIP checkpoint (a whole ``CLIPModel`` or a vision tower) loads as ``vision_class``: projected
    features keep ``visual_projection``, and ``with_text`` (the CLIP text interaction) the whole
    ``CLIPModel``. A checkpoint that lacks what is asked for (a vision tower saved without its
    projection, a vision tower where the text tower is needed) is refused rather than filled with
    random weights. Any other model loads with ``AutoModel``, its image side kept (``vision_model``
    of a two-tower checkpoint such as SigLIP's).
    """
    import transformers
    from transformers import AutoConfig

    name, features = str(name), tuple(features)
    config = AutoConfig.from_pretrained(name, revision=revision)
    kind = config.model_type
    if kind not in _CLIP_KINDS:
        if with_text or "projected" in features:
            raise ValueError(f"vision: {name} is a {kind!r} checkpoint; "
                             f"{'the CLIP text interaction' if with_text else 'projected features'} need a CLIP "
                             "checkpoint")
        model = transformers.AutoModel.from_pretrained(name, revision=revision, dtype=dtype)
        tower = getattr(model, "vision_model", model)
        tower.source = Source(name, getattr(model.config, "_commit_hash", None) or revision, kind)
        return tower
    chosen = vision_class(features, with_text)
    if chosen == "CLIPModel" and kind != "clip":
        raise ValueError(f"vision: {name} holds a CLIP vision tower only; the CLIP text interaction needs a whole "
                         "CLIPModel checkpoint (vision and text towers)")
    settings = {}
    if chosen == "CLIPVisionModelWithProjection" and kind == "clip":
        # The vision config taken out of a whole CLIP config keeps its own default projection width.
        settings["projection_dim"] = config.projection_dim
    model, info = getattr(transformers, chosen).from_pretrained(name, revision=revision, dtype=dtype,
                                                                output_loading_info=True, **settings)
    missing = [key for key in info["missing_keys"] if "projection" in key or chosen == "CLIPModel"]
    missing += [str(entry[0] if isinstance(entry, tuple) else entry) for entry in info.get("mismatched_keys", ())]
    if missing:
        raise ValueError(f"vision: {name} lacks {missing[0]} (and {len(missing) - 1} more) that {chosen} needs for "
                         f"the features {list(features)}; save the checkpoint with them, or pick features it has")
    model.source = Source(name, getattr(model.config, "_commit_hash", None) or revision, kind)  # the checkpoint's
    return model
