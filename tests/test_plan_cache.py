"""The launch-plan caches miss on a change of anything a plan depends on: one key helper
(``checks.metadata_key``) for every op and for the layer's argument checks."""

import pytest
import torch

from lmeye_fast import InteractiveLayer
from lmeye_fast.checks import metadata_key

pytest.importorskip("triton")

DEVICE = "cpu"


def test_the_key_tells_apart_every_property():
    base = torch.zeros(3, 4)
    same = metadata_key(torch.ones(3, 4), 2, True)
    assert metadata_key(base, 2, True) == same
    changed = {
        "shape": metadata_key(torch.zeros(4, 3), 2, True),
        "stride": metadata_key(torch.zeros(4, 3).t(), 2, True),
        "dtype": metadata_key(base.half(), 2, True),
        "device": metadata_key(base.to("meta"), 2, True),
        "absent": metadata_key(None, 2, True),
        "count": metadata_key(base, 3, True),
        "flag": metadata_key(base, 2, False),
    }
    for name, key in changed.items():
        assert key != same, name
    assert len(set(changed.values())) == len(changed)


def misses(module, call, variants):
    """Run ``call`` once, then each variant: every one must add a plan to ``module._PLANS`` (a miss)."""
    module._PLANS.clear()
    with torch.no_grad():
        call()
        for name, variant in variants.items():
            before = len(module._PLANS)
            variant()
            assert len(module._PLANS) == before + 1, name


def test_request_plans_miss_on_every_keyed_change():
    from lmeye_fast.ops import request

    hidden, w, b = torch.randn(2, 5, 8), torch.randn(6, 8), torch.randn(6)
    pos = torch.tensor([1, 3])
    misses(request, lambda: request.request(hidden, pos, w, b, 2), {
        "shape": lambda: request.request(hidden[:, :4], pos, w, b, 2),
        "stride": lambda: request.request(hidden.transpose(0, 1).contiguous().transpose(0, 1), pos, w, b, 2),
        "dtype": lambda: request.request(hidden.half(), pos, w.half(), b.half(), 2),
        "index dtype": lambda: request.request(hidden, pos.int(), w, b, 2),
        "no bias": lambda: request.request(hidden, pos, w, None, 2),
        "count": lambda: request.request(hidden, pos, w, b, 3),
    })


def test_attention_plans_miss_on_every_keyed_change():
    from lmeye_fast.ops import attend

    r, x, w = torch.randn(2, 3, 8), torch.randn(2, 4, 6), torch.randn(8, 6)
    mask = torch.ones(2, 4, dtype=torch.bool)
    misses(attend, lambda: attend.attend_decomposed(r, x, mask, w, None, 2, 1), {
        "stride": lambda: attend.attend_decomposed(r, x, mask, w.t().contiguous().t(), None, 2, 1),
        "mask": lambda: attend.attend_decomposed(r, x, None, w, None, 2, 1),
        "heads": lambda: attend.attend_decomposed(r, x, mask, w, None, 4, 1),
        "schedule": lambda: attend.attend_decomposed(r, x, mask, w, None, 2, 1, "folded"),
    })


def test_transmit_interleave_plans_miss_on_every_keyed_change():
    from lmeye_fast.ops import transmit

    z, w, embeds = torch.randn(2, 2, 4), torch.randn(6, 4), torch.randn(2, 5, 6)
    slots = torch.tensor([[0, 3], [1, 2]])
    misses(transmit, lambda: transmit.transmit_interleave(z, w, None, None, embeds, slots), {
        "inplace": lambda: transmit.transmit_interleave(z, w, None, None, embeds.clone(), slots, inplace=True),
        "slot stride": lambda: transmit.transmit_interleave(z, w, None, None, embeds, slots.t().contiguous().t()),
        "slot embedding": lambda: transmit.transmit_interleave(z, w, None, torch.randn(2, 6), embeds, slots),
        "sequence length": lambda: transmit.transmit_interleave(z, w, None, None, embeds[:, :4], slots),
    })


def test_the_layer_checks_again_when_the_inputs_change():
    layer = InteractiveLayer(8, 6, 8, 2, 1, 2, backend="reference")
    hidden, image, embeds = torch.randn(2, 5, 8), torch.randn(2, 4, 6), torch.randn(2, 7, 8)
    slots, pos = torch.tensor([[5, 6], [5, 6]]), torch.tensor([4, 4])
    layer(hidden, image, embeds, slots, request_pos=pos)
    assert len(layer._checked) == 1
    layer(hidden, image, embeds, slots, request_pos=pos)
    assert len(layer._checked) == 1
    layer(hidden, image.transpose(0, 1).contiguous().transpose(0, 1), embeds, slots, request_pos=pos)
    assert len(layer._checked) == 2
    with pytest.raises(ValueError, match="image"):
        layer(hidden, torch.randn(2, 4, 5), embeds, slots, request_pos=pos)
    assert len(layer._checked) == 2
