"""read_image (every Pillow mode to 8-bit RGB, 16-bit scaled) and load_vision (the class the features need,
nothing filled with random weights), shared by training, evaluation and the lmms-eval model."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from lmeye_fast.models.tiny import tiny_clip, tiny_clip_model
from lmeye_fast.models.vision import load_vision, read_image

MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBX", "RGBa", "La",
         "I;16", "I;16L", "I;16B", "I;16N"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_becomes_8_bit_rgb(mode):
    picture = Image.new(mode, (5, 3))
    out = read_image(picture)
    assert out.mode == "RGB" and out.size == (5, 3)


def png(picture) -> io.BytesIO:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    buffer.seek(0)
    return buffer


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896], [65535, 1000, 50000]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I")  # Pillow reads a 16-bit PNG as one of them
    expected = np.rint(values / 257.0).astype(np.uint8)
    got = np.asarray(read_image(path))
    assert got.shape == (2, 3, 3) and (got == expected[..., None]).all()
    wide = Image.fromarray(values.astype(np.int32), mode="I")
    assert (np.asarray(read_image(wide))[..., 0] == expected).all()
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(read_image(floats))[0, :, 0].tolist() == [0, 128, 255]


def test_transparency_is_composited_over_white():
    colour = tuple(random.randrange(256) for _ in range(3))
    clear = Image.new("RGBA", (2, 2), colour + (0,))
    assert read_image(clear).getpixel((0, 0)) == (255, 255, 255)
    solid = Image.new("RGBA", (2, 2), colour + (255,))
    assert read_image(solid).getpixel((0, 0)) == colour
    palette = Image.new("P", (2, 2), 0)
    palette.info["transparency"] = 0
    assert read_image(palette).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    picture = Image.new("RGB", (4, 2), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    path = tmp_path / "turned.jpg"
    picture.save(path, exif=exif)
    assert read_image(path).size == (2, 4)


def test_unreadable_files_raise_oserror_naming_them(tmp_path):
    with pytest.raises(OSError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match="bad.png"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(TypeError, match="image: expected a path or a PIL image"):
        read_image(3)


def test_load_vision_gives_each_feature_its_class_and_refuses_what_is_missing(tmp_path):
    clip = tiny_clip_model(image_size=16, patch_size=8, hidden=24, text_hidden=16)
    clip.save_pretrained(tmp_path / "clip")
    tiny_clip(image_size=16, patch_size=8, hidden=24).save_pretrained(tmp_path / "tower")
    assert type(load_vision(tmp_path / "clip", ("tokens",))).__name__ == "CLIPVisionModel"
    projected = load_vision(tmp_path / "clip", ("projected", "tokens"))
    assert type(projected).__name__ == "CLIPVisionModelWithProjection"
    assert torch.equal(projected.visual_projection.weight, clip.visual_projection.weight)
    assert type(load_vision(tmp_path / "clip", ("projected",), with_text=True)).__name__ == "CLIPModel"
    assert projected.source.model_type == "clip" and projected.source.name == str(tmp_path / "clip")
    with pytest.raises(ValueError, match="lacks visual_projection"):
        load_vision(tmp_path / "tower", ("projected",))
    with pytest.raises(ValueError, match="needs a whole CLIPModel checkpoint"):
        load_vision(tmp_path / "tower", ("tokens",), with_text=True)
