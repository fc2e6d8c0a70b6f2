"""lmeye_fast.data: caption and LLaVA records, the token layout and labels, images, bad images, loaders."""

import csv
import json
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler
from training_helpers import COLOURS, image_processor, tiny_model, tiny_parts, write_llava

from lmeye_fast.data import LMEyeCollator, LMEyeDataset, LMEyeStream, load_records
from lmeye_fast.models import IGNORE_INDEX


def words(processor, ids):
    return processor.tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def test_llava_multi_turn_layout_and_labels(tmp_path):
    processor, _, _ = tiny_parts()
    dataset = LMEyeDataset(write_llava(tmp_path, count=1, text_only=1), processor, image_processor(),
                           image_folder=tmp_path / "images")
    batch = LMEyeCollator(processor)([dataset[0], dataset[1]])
    P, R, N = batch["prefix_len"], processor.num_requests, processor.num_image_tokens
    ids, labels = batch["input_ids"], batch["labels"]

    # The image row: [bos] USER: <img> x N what colour is it <img-q> | <img-d> x R ASSISTANT: red <eos> USER: ...
    row = words(processor, ids[0][batch["attention_mask"][0].bool()])
    assert row[:3 + N] == ["<bos>", "USER:"] + ["<img>"] * N + ["what"]
    assert row[row.index("<img-q>"):row.index("<img-q>") + R + 2] == ["<img-q>"] + ["<img-d>"] * R + ["ASSISTANT:"]
    assert int(ids[0, P - 1]) == processor.request_token_id
    assert (ids[0, batch["slot_pos"][0]] == processor.slot_token_id).all()
    assert (ids[0, batch["image_pos"][0]] == processor.image_token_id).all()
    # Labels: both answers and the EOS ending each, nothing else.
    assert words(processor, labels[0][labels[0] != IGNORE_INDEX]) == ["red", "<eos>", "a", "red", "image", "<eos>"]

    # The text-only row: no <img>, <img-q> or <img-d>; image and slot positions outside the sequence.
    text = words(processor, ids[1][batch["attention_mask"][1].bool()])
    assert text == ["<bos>", "USER:", "hello", "ASSISTANT:", "hi", "<eos>"]
    assert (batch["image_pos"][1] == -1).all() and (batch["slot_pos"][1] == -1).all()
    assert words(processor, labels[1][labels[1] != IGNORE_INDEX]) == ["hi", "<eos>"]
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and not batch["pixel_values"][1].any()


@pytest.mark.parametrize("schedule", ["single_pass", "two_pass"])
def test_text_only_row_is_the_plain_llm(tmp_path, schedule):
    """In a batch with an image row, a text-only row's logits are the LLM's own on its tokens."""
    processor, model = tiny_model()
    dataset = LMEyeDataset(write_llava(tmp_path, count=1, text_only=1), processor, image_processor(),
                           image_folder=tmp_path / "images")
    batch = LMEyeCollator(processor)([dataset[0], dataset[1]])
    with torch.no_grad():
        logits = model(**batch, schedule=schedule, all_logits=True).logits[1]
        keep = batch["attention_mask"][1].bool()
        plain = model.llm(input_ids=batch["input_ids"][1:, keep]).logits[0]
    torch.testing.assert_close(logits[keep], plain, rtol=1e-5, atol=1e-5)


def test_captions_from_jsonl_csv_and_datasets_are_the_same(tmp_path):
    datasets = pytest.importorskip("datasets")
    processor, _, _ = tiny_parts()
    write_llava(tmp_path, count=3)
    records = [{"image": f"{i}.png", "caption": f"a {colour} image"} for i, colour in enumerate(list(COLOURS)[:3])]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with (tmp_path / "captions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "caption"])
        writer.writeheader()
        writer.writerows(records)
    sources = [tmp_path / "captions.jsonl", tmp_path / "captions.csv", datasets.Dataset.from_list(records)]
    collate = LMEyeCollator(processor)
    batches = [collate([LMEyeDataset(source, processor, image_processor(), image_folder=tmp_path / "images",
                                     caption_prompt="describe")[i] for i in range(3)]) for source in sources]
    for batch in batches[1:]:
        assert batch.keys() == batches[0].keys()
        for key, value in batch.items():
            assert torch.equal(value, batches[0][key]) if isinstance(value, torch.Tensor) else value == batches[0][key]
    labels = batches[0]["labels"][0]
    assert words(processor, labels[labels != IGNORE_INDEX]) == ["a", "red", "image", "<eos>"]


def test_pixels_come_from_the_image_processor(tmp_path):
    processor, _, _ = tiny_parts()
    dataset = LMEyeDataset(write_llava(tmp_path, count=2), processor, image_processor(),
                           image_folder=tmp_path / "images")
    from PIL import Image

    expected = image_processor()(images=Image.open(tmp_path / "images" / "1.png").convert("RGB"),
                                 return_tensors="pt")["pixel_values"][0]
    assert torch.equal(dataset[1]["pixel_values"], expected)


def test_bad_images_are_skipped_with_one_warning_or_raise(tmp_path):
    processor, _, _ = tiny_parts()
    path = write_llava(tmp_path, count=4)
    (tmp_path / "images" / "1.png").unlink()
    (tmp_path / "images" / "2.png").write_bytes(b"not a png")
    dataset = LMEyeDataset(path, processor, image_processor(), image_folder=tmp_path / "images")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [dataset[i] for i in range(4)]
    assert len([w for w in caught if "unreadable image" in str(w.message)]) == 1
    assert [p.rsplit("/", 1)[-1] for p in dataset.skipped_images] == ["1.png", "2.png", "2.png"]
    # Items 1 and 2 are replaced by the next readable record, 3.
    assert torch.equal(items[1]["pixel_values"], items[3]["pixel_values"])
    assert torch.equal(items[2]["pixel_values"], items[3]["pixel_values"])

    strict = LMEyeDataset(path, processor, image_processor(), image_folder=tmp_path / "images",
                          on_bad_image="raise")
    with pytest.raises(OSError, match="1.png"):
        strict[1]
    with pytest.raises(OSError, match="2.png"):
        strict[2]


def test_malformed_records_raise_at_construction_naming_the_record(tmp_path):
    processor, _, _ = tiny_parts()
    bad = [
        ({"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}, "human"),
        ({"conversations": [{"from": "human", "value": "x"}]}, "pairs"),
        ({"image": "a.png"}, "caption"),
        ({"conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}]}, "without"),
        ({"image": "a.png", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"},
                                              {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "z"}]},
         "first human turn"),
    ]
    for record, message in bad:
        with pytest.raises(ValueError, match=rf"records\[1\].*{message}"):
            LMEyeDataset([{"caption": "fine"}, record], processor, image_processor())
    with pytest.raises(ValueError, match="on_bad_image"):
        LMEyeDataset([{"caption": "fine"}], processor, image_processor(), on_bad_image="ignore")
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_records(tmp_path / "nothing.json")


def test_max_length_cuts_the_suffix(tmp_path):
    processor, _, _ = tiny_parts()
    dataset = LMEyeDataset(write_llava(tmp_path, count=1), processor, image_processor(),
                           image_folder=tmp_path / "images", max_length=16)
    row = dataset[0]["row"]
    assert len(row.prefix) + processor.num_requests + len(row.body) == 16


def test_loader_workers_and_distributed_sampler_give_the_same_batches(tmp_path):
    processor, _, _ = tiny_parts()
    dataset = LMEyeDataset(write_llava(tmp_path, count=8, text_only=2), processor, image_processor(),
                           image_folder=tmp_path / "images")
    collate = LMEyeCollator(processor)
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=3)
        indices = list(sampler)
        assert len(indices) == 5
        loaded = list(DataLoader(dataset, batch_size=3, sampler=sampler, num_workers=2, collate_fn=collate))
        expected = [collate([dataset[i] for i in indices[k:k + 3]]) for k in range(0, 5, 3)]
        assert len(loaded) == len(expected) == 2
        for got, want in zip(loaded, expected):
            assert got["prefix_len"] == want["prefix_len"]
            for key in want:
                if isinstance(want[key], torch.Tensor):
                    assert torch.equal(got[key], want[key]), key


def _items(dataset):
    """(prefix, body, labels, pixel sum) of each item, comparable across datasets and loader workers."""
    return [(tuple(item["row"].prefix), tuple(item["row"].body), tuple(item["row"].body_labels), item["row"].image_start,
             round(float(item["pixel_values"].double().sum()), 6)) for item in dataset]


def _one_by_one(items):
    return items[0]


def test_a_datasets_stream_gives_the_items_of_the_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    processor, _, _ = tiny_parts()
    path = write_llava(tmp_path, count=5, text_only=2)
    stream = datasets.load_dataset("json", data_files=str(path), streaming=True, split="train")
    expected = _items(LMEyeDataset(path, processor, image_processor(), image_folder=tmp_path / "images"))
    assert _items(LMEyeStream(stream, processor, image_processor(), image_folder=tmp_path / "images")) == expected
    # datasets' map runs lazily on the stream, as it would on a data set larger than memory.
    captions = [{"image": f"{i}.png", "text": f"a {colour} image"} for i, colour in enumerate(list(COLOURS)[:3])]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in captions))
    renamed = datasets.load_dataset("json", data_files=str(tmp_path / "captions.jsonl"), streaming=True,
                                    split="train").map(lambda r: {"caption": r["text"]})
    as_captions = [{"image": r["image"], "caption": r["text"]} for r in captions]
    assert _items(LMEyeStream(renamed, processor, image_processor(), image_folder=tmp_path / "images")) == \
        _items(LMEyeDataset(as_captions, processor, image_processor(), image_folder=tmp_path / "images"))


@pytest.mark.parametrize("source", ["list", "datasets"])
def test_loader_workers_share_a_stream_without_repeats(tmp_path, source):
    processor, _, _ = tiny_parts()
    path = write_llava(tmp_path, count=7, text_only=2)
    records = json.loads(path.read_text())
    if source == "datasets":
        datasets = pytest.importorskip("datasets")
        # Two files, so each of the two workers reads a shard of its own.
        for part in range(2):
            (tmp_path / f"part{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[part::2]))
        records = datasets.load_dataset("json", data_files=[str(tmp_path / f"part{p}.jsonl") for p in range(2)],
                                        streaming=True, split="train")
    stream = LMEyeStream(records, processor, image_processor(), image_folder=tmp_path / "images")
    loaded = _items(DataLoader(stream, batch_size=1, num_workers=2, collate_fn=_one_by_one))
    expected = _items(LMEyeDataset(path, processor, image_processor(), image_folder=tmp_path / "images"))
    assert sorted(loaded) == sorted(expected)


def test_a_stream_skips_bad_images_or_raises_and_names_a_malformed_record(tmp_path):
    processor, _, _ = tiny_parts()
    path = write_llava(tmp_path, count=4)
    (tmp_path / "images" / "1.png").unlink()
    records = json.loads(path.read_text())
    stream = LMEyeStream(records, processor, image_processor(), image_folder=tmp_path / "images")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(stream)
    assert len(items) == 3 and len([w for w in caught if "unreadable image" in str(w.message)]) == 1
    assert [p.rsplit("/", 1)[-1] for p in stream.skipped_images] == ["1.png"]
    with pytest.raises(OSError, match="1.png"):
        list(LMEyeStream(records, processor, image_processor(), image_folder=tmp_path / "images",
                         on_bad_image="raise"))
    with pytest.raises(ValueError, match=r"records\[2\].*caption"):
        list(LMEyeStream([records[0], records[2], {"image": "0.png"}], processor, image_processor(),
                         image_folder=tmp_path / "images"))
    for bad in (path, str(path), records[0]):
        with pytest.raises(TypeError, match="records: expected an iterable of record dicts"):
            LMEyeStream(bad, processor, image_processor())


def test_an_index_past_the_end_raises_index_error(tmp_path):
    """So that ``for item in dataset`` and ``list(dataset)`` end, as for any sequence."""
    processor, _, _ = tiny_parts()
    dataset = LMEyeDataset(write_llava(tmp_path, count=3), processor, image_processor(),
                           image_folder=tmp_path / "images")
    assert len(list(dataset)) == 3
    assert torch.equal(dataset[-1]["pixel_values"], dataset[2]["pixel_values"])
    for index in (3, -4):
        with pytest.raises(IndexError, match="index"):
            dataset[index]
