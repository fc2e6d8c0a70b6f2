"""The data on the user's path: every error names the file and the record (line for JSONL, index for
JSON, row for CSV) and what is wrong; nothing is silently converted. Each case asserts the exception
type and the place in the message."""

import json
import re

import pytest
import torch
from training_helpers import image_processor, tiny_parts

from lmeye_fast.data import LMEyeDataset, load_records, read_record_file


def _where(path, place):
    return re.escape(f"{path}: {place}")


def test_a_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"caption": "a"}\n\n{"caption": "b"\n')
    with pytest.raises(ValueError, match=_where(path, "line 3, column") + r".*not valid JSON"):
        load_records(path)


def test_a_malformed_json_file_is_named_with_its_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"caption": "a"},\n {"caption": }]')
    with pytest.raises(ValueError, match=_where(path, "line 2, column") + r".*not valid JSON"):
        load_records(path)
    path.write_text('{"caption": "a"}')
    with pytest.raises(ValueError, match=_where(path, "expected a JSON list of records, got dict")):
        load_records(path)


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes('{"caption": "a"}\n{"caption": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=_where(path, "line 2: not UTF-8 text")):
        load_records(path)


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_a_byte_order_mark_is_dropped(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    record = {"image": "0.png", "caption": "a red image"}
    text = {".csv": "image,caption\n0.png,a red image\n", ".json": json.dumps([record]),
            ".jsonl": json.dumps(record) + "\n"}[suffix]
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert load_records(path) == [record]  # with the BOM the CSV's first column was "\ufeffimage"


def test_csv_rows_are_named_counting_the_header(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("image,caption\n0.png,red\n1.png,blue,extra\n")
    with pytest.raises(ValueError, match=_where(path, "row 3: more fields than the header")):
        load_records(path)
    path.write_text("image,caption\n0.png,red\n1.png,blue\n")
    assert [entry.where for entry in read_record_file(path)] == [f"{path}: row 2", f"{path}: row 3"]


def test_a_malformed_record_is_named_by_its_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"caption": "a"}) + "\n" + json.dumps({"image": "0.png"}) + "\n")
    processor, _, _ = tiny_parts()
    with pytest.raises(ValueError, match=_where(path, "line 2: expected a 'conversations' list")):
        LMEyeDataset(path, processor, image_processor())


def test_max_length_that_cuts_every_answer_token_is_refused_naming_the_record(tmp_path):
    path = tmp_path / "data.jsonl"
    long = " ".join(["what colour is it"] * 10)
    path.write_text(json.dumps({"conversations": [{"from": "human", "value": long},
                                                  {"from": "gpt", "value": "red"}]}) + "\n")
    processor, _, _ = tiny_parts()
    dataset = LMEyeDataset(path, processor, image_processor(), max_length=8)
    with pytest.raises(ValueError, match=_where(path, "line 1: max_length=8 cuts every answer token")):
        dataset[0]
    item = LMEyeDataset(path, processor, image_processor(), max_length=64)[0]
    assert any(label != -100 for label in item["row"].body_labels)
    assert isinstance(item["pixel_values"], torch.Tensor)


def _dataset_of_images(tmp_path, pictures, **kwargs):
    from PIL import Image  # noqa: F401  (the pictures are PIL images)

    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    lines = []
    for index, picture in enumerate(pictures):
        picture.save(folder / f"{index}.png")
        lines.append(json.dumps({"image": f"{index}.png", "caption": "red"}))
    path = tmp_path / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    processor, _, _ = tiny_parts()
    return LMEyeDataset(path, processor, image_processor(), image_folder=folder, **kwargs), folder


def test_a_16_bit_png_reads_as_its_grey_not_white(tmp_path):
    import numpy as np
    from PIL import Image

    sixteen = Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16))  # 32896 / 65535 of white: grey 128
    eight = Image.new("L", (16, 16), 128)
    dataset, _ = _dataset_of_images(tmp_path, [sixteen, eight])
    assert Image.open(tmp_path / "images" / "0.png").mode.startswith("I")
    assert torch.equal(dataset[0]["pixel_values"], dataset[1]["pixel_values"])


def test_a_decompression_bomb_counts_as_an_unreadable_image(tmp_path, monkeypatch):
    from PIL import Image

    pictures = [Image.new("RGB", (64, 64), (200, 10, 10)), Image.new("RGB", (8, 8), (10, 10, 200))]
    dataset, folder = _dataset_of_images(tmp_path, pictures, on_bad_image="raise")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 is over twice this: Pillow refuses to decode
    with pytest.raises(OSError, match=re.escape(f"image {folder / '0.png'}")):
        dataset[0]
    skipping, _ = _dataset_of_images(tmp_path, pictures)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        item = skipping[0]  # the next readable record instead
    assert torch.equal(item["pixel_values"], skipping[1]["pixel_values"])
    assert skipping.skipped_images == [str(folder / "0.png")]


def test_a_stream_with_no_readable_image_stops_with_an_error(tmp_path):
    from lmeye_fast.data import LMEyeStream

    records = [{"image": "missing.png", "caption": "red"}, {"image": "gone.png", "caption": "blue"}]
    processor, _, _ = tiny_parts()
    stream = LMEyeStream(records, processor, image_processor(), image_folder=tmp_path)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        with pytest.raises(OSError, match=r"^records: none of the 2 records read has a readable image .*missing\.png"):
            list(stream)


def _modes():
    import numpy as np
    from PIL import Image

    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # black under full transparency: white, not black
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0, 0, 0] * 254)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 1
    return [
        ("RGBA", clear, (255, 255, 255)), ("LA", Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
        ("P", palette, (200, 10, 10)), ("P transparent", transparent_palette, (255, 255, 255)),
        ("L", Image.new("L", (4, 4), 77), (77, 77, 77)), ("1", Image.new("1", (4, 4), 1), (255, 255, 255)),
        ("I;16", Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)), (255, 255, 255)),
        ("I", Image.fromarray(np.full((4, 4), 257 * 100, dtype=np.int32)), (100, 100, 100)),
        ("F", Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)), (128, 128, 128)),
        ("CMYK", Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    ]


@pytest.mark.parametrize("mode, picture, rgb", _modes(), ids=[m[0] for m in _modes()])
def test_every_image_mode_becomes_its_rgb(mode, picture, rgb):
    from lmeye_fast.models.vision import read_image

    converted = read_image(picture)
    assert converted.mode == "RGB" and converted.getpixel((1, 1)) == rgb


def test_an_unreadable_image_file_is_named(tmp_path):
    from lmeye_fast.models.vision import read_image

    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with pytest.raises(OSError, match=re.escape(f"image {path}: ")):
        read_image(path)
    with pytest.raises(OSError, match=re.escape(f"image {tmp_path / 'missing.png'}: ")):
        read_image(tmp_path / "missing.png")


@pytest.mark.parametrize("record, field", [
    ({"conversations": [{"from": "human", "value": "what ?"}, {"from": "gpt", "value": None}]},
     r"conversations\[1\]\.value must be a string, got NoneType"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "red"}]},
     r"conversations\[0\]\.value must be a string, got int"),
    ({"caption": ["a", "list"]}, r"'caption' must be a string, got list"),
    ({"image": 5, "caption": "red"}, r"'image' must be a path string, got int"),
])
def test_a_field_of_the_wrong_type_is_refused_never_turned_into_text(tmp_path, record, field):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"caption": "fine"}, record]))
    processor, _, _ = tiny_parts()
    with pytest.raises(ValueError, match=_where(path, "record 1: ") + field):
        LMEyeDataset(path, processor, image_processor())
