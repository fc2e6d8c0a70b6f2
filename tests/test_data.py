"""lmeye_fast.data: caption and LLaVA records, the token layout and labels, images, bad images, loaders, and the
encoder-decoder layout of the same records."""

import csv
import json
import random
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler
from training_helpers import COLOURS, image_processor, tiny_model, tiny_parts, write_llava

from lmeye_fast.data import LMEyeCollator, LMEyeDataset, LMEyeStream, load_records
from lmeye_fast.models import IGNORE_INDEX, LMEyeProcessor
from lmeye_fast.models.processor import TokenizedRow


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


# ---------------------------------------------------------------- encoder-decoder LLMs

# Words of the conversations (the role words "USER:" and "ASSISTANT:" are the template's).
CONTENT = list(COLOURS) + "what colour is it the image shows a and describe hello hi yes no".split()


def random_words(low, high):
    return [random.choice(CONTENT) for _ in range(random.randint(low, high))]


def random_conversation(turns, image):
    """(record, question words, where the image goes in them or None, answer words per turn, later questions)."""
    questions = [random_words(1, 5) for _ in range(turns)]
    answers = [random_words(1, 4) for _ in range(turns)]
    cut = random.randint(0, len(questions[0])) if image else None
    first = questions[0] if cut is None else questions[0][:cut] + ["<image>"] + questions[0][cut:]
    messages = []
    for question, answer in zip([first] + questions[1:], answers):
        messages += [{"from": "human", "value": " ".join(question)}, {"from": "gpt", "value": " ".join(answer)}]
    record = {"conversations": messages, **({"image": f"{random.randrange(4)}.png"} if image else {})}
    return record, questions, cut, answers


def expected_encoder_decoder_row(processor, questions, cut, answers):
    """(encoder tokens, decoder input tokens, label tokens with None where IGNORE_INDEX) of one conversation
    under the vicuna template (the image opens the first user turn, wherever the record's tag stood), written
    out from the layout of docs/encoder_decoder.md: the first response prefix ends the encoder's input."""
    N, R = processor.num_image_tokens, processor.num_requests
    if cut is None:
        encoder = ["<bos>", "USER:"] + questions[0] + ["ASSISTANT:", "<eos>"]
    else:
        encoder = (["<bos>", "USER:"] + ["<img>"] * N + questions[0] + ["<img-q>"] + ["<img-d>"] * R
                   + ["ASSISTANT:", "<eos>"])
    body, labels = answers[0] + ["<eos>"], answers[0] + ["<eos>"]
    for question, answer in zip(questions[1:], answers[1:]):
        prompt = ["USER:"] + question + ["ASSISTANT:"]
        body += prompt + answer + ["<eos>"]
        labels += [None] * len(prompt) + answer + ["<eos>"]
    start = processor.tokenizer.convert_ids_to_tokens(processor.decoder_start_token_id)
    return encoder, [start] + body[:-1], labels


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_collated_conversations_against_a_hand_built_layout(tmp_path, arch):
    processor, _, _ = tiny_parts(num_requests=random.randint(1, 3), arch=arch)
    write_llava(tmp_path, count=4)  # the images
    images = [True, False] + [random.random() < 0.5 for _ in range(3)]
    random.shuffle(images)
    drawn = [random_conversation(random.randint(1, 3), image) for image in images]
    dataset = LMEyeDataset([record for record, *_ in drawn], processor, image_processor(),
                           image_folder=tmp_path / "images")
    collate = LMEyeCollator(processor)
    batch = collate(list(dataset))

    ids = processor.tokenizer.convert_tokens_to_ids
    rows = [expected_encoder_decoder_row(processor, *conversation) for _, *conversation in drawn]
    B, T, L = len(rows), max(len(row[0]) for row in rows), max(len(row[1]) for row in rows)
    N, R = processor.num_image_tokens, processor.num_requests
    want = {"input_ids": torch.full((B, T), processor.pad_token_id), "attention_mask": torch.zeros(B, T),
            "image_pos": torch.full((B, N), -1), "request_pos": torch.zeros(B), "slot_pos": torch.full((B, R), -1),
            "decoder_input_ids": torch.full((B, L), processor.pad_token_id),
            "labels": torch.full((B, L), IGNORE_INDEX)}
    for index, ((encoder, decoder, labels), (_, _, cut, _)) in enumerate(zip(rows, drawn)):
        want["input_ids"][index, :len(encoder)] = torch.tensor(ids(encoder))
        want["attention_mask"][index, :len(encoder)] = 1
        want["decoder_input_ids"][index, :len(decoder)] = torch.tensor(ids(decoder))
        want["labels"][index, :len(labels)] = torch.tensor([IGNORE_INDEX if t is None else ids(t) for t in labels])
        if cut is not None:
            want["image_pos"][index] = torch.arange(2, 2 + N)
            want["request_pos"][index] = encoder.index("<img-q>")
            want["slot_pos"][index] = torch.arange(R) + encoder.index("<img-q>") + 1
    assert set(batch) == set(want) | {"pixel_values"}
    for key, value in want.items():
        assert torch.equal(batch[key], value.long()), key
    pixels = torch.stack([item["pixel_values"] for item in dataset])
    assert torch.equal(batch["pixel_values"], pixels)
    assert not pixels[[not image for image in images]].any()  # text-only rows: blank pixels, read by nothing

    # A stream of the same records gives the same batch.
    streamed = collate(list(LMEyeStream([record for record, *_ in drawn], processor, image_processor(),
                                        image_folder=tmp_path / "images")))
    assert all(torch.equal(streamed[key], batch[key]) for key in batch)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_single_turn_batch_gives_the_loss_of_the_processor_call(tmp_path, arch):
    """A one-turn conversation's decoder reads just the answer (the response prefix ends the encoder's input):
    the collated batch is the processor's own batch for the same question and answer, and its explicit decoder
    input is, in every
    labelled column, the one the LLM derives from the labels (the padding columns, which predict nothing,
    read the pad token here and the shifted-in EOS there)."""
    processor, model = tiny_model(arch=arch)
    write_llava(tmp_path, count=4)
    drawn = [random_conversation(1, image=True) for _ in range(3)]
    dataset = LMEyeDataset([record for record, *_ in drawn], processor, image_processor(),
                           image_folder=tmp_path / "images")
    collated = LMEyeCollator(processor)(list(dataset))
    prompts = [record["conversations"][0]["value"] for record, *_ in drawn]
    called = processor(prompts, [" ".join(answers[0]) for *_, answers in drawn], images=collated["pixel_values"])

    assert set(collated) == set(called) | {"decoder_input_ids"}
    for key, value in called.items():
        assert torch.equal(collated[key], value), key
    labelled = called["labels"] != IGNORE_INDEX
    derived = model.llm.prepare_decoder_input_ids_from_labels(labels=called["labels"])
    assert torch.equal(collated["decoder_input_ids"][labelled], derived[labelled])
    assert (collated["decoder_input_ids"][~labelled] == processor.pad_token_id).all()
    with torch.no_grad():
        got, expected = model(**collated), model(**called)
    torch.testing.assert_close(got.logits[labelled], expected.logits[labelled], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-6, atol=1e-6)


def test_encoder_decoder_text_only_row_is_the_plain_llm(tmp_path):
    """In a batch with an image row, a text-only row's decoder logits are the LLM's own on its tokens."""
    processor, model = tiny_model(arch="t5")
    write_llava(tmp_path, count=4)
    records = [random_conversation(random.randint(1, 3), image)[0] for image in (True, False)]
    dataset = LMEyeDataset(records, processor, image_processor(), image_folder=tmp_path / "images")
    batch = LMEyeCollator(processor)(list(dataset))
    length = len(dataset[1]["row"].body)
    with torch.no_grad():
        logits = model(**batch).logits[1, :length]
        keep = batch["attention_mask"][1].bool()
        plain = model.llm(input_ids=batch["input_ids"][1:, keep],
                          decoder_input_ids=batch["decoder_input_ids"][1:, :length]).logits[0]
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)


def test_encoder_decoder_max_length_cuts_the_decoder_only(tmp_path):
    processor, _, _ = tiny_parts(arch="t5")
    path = write_llava(tmp_path, count=1)
    whole = LMEyeDataset(path, processor, image_processor(), image_folder=tmp_path / "images")[0]["row"]
    max_length = random.randint(1, len(whole.body) - 1)
    row = LMEyeDataset(path, processor, image_processor(), image_folder=tmp_path / "images",
                       max_length=max_length)[0]["row"]
    assert row == TokenizedRow(whole.prefix, whole.image_start, whole.body[:max_length],
                               whole.body_labels[:max_length])


def test_encoder_decoder_bad_input_is_refused_by_name():
    processor, _, _ = tiny_parts(arch="t5")
    rows = [TokenizedRow(*processor.prefix_ids("red"), [5, 6], [IGNORE_INDEX, 6]),
            TokenizedRow(*processor.prefix_ids("hello", image=False), [5, 6], [6])]
    with pytest.raises(ValueError, match=r"^rows\[1\]: 2 body tokens but 1 labels"):
        processor.pad(rows)
    without_start = LMEyeProcessor(processor.tokenizer, num_image_tokens=5, encoder_decoder=True)
    with pytest.raises(ValueError, match="^processor: an encoder-decoder processor needs decoder_start_token_id"):
        LMEyeCollator(without_start)
    with pytest.raises(ValueError, match="^decoder_start_token_id: required"):
        without_start.pad(rows[:1])
    with pytest.raises(ValueError, match="^decoder_start_token_id: only an encoder-decoder LLM"):
        LMEyeProcessor(processor.tokenizer, num_image_tokens=5, decoder_start_token_id=0)
    for bad in (-1, "0", True, 1.0):
        with pytest.raises(ValueError, match="^decoder_start_token_id: expected a token id"):
            LMEyeProcessor(processor.tokenizer, num_image_tokens=5, encoder_decoder=True, decoder_start_token_id=bad)
