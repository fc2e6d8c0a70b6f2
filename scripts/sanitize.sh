#!/usr/bin/env bash
# Runs the lmeye_fast CUDA operators and the Triton ops (InteractiveLayer in both
# attention schedules, StaticVisualMapping, the interleave) under compute-sanitizer
# (memcheck, racecheck, synccheck, initcheck) on valid and malformed input:
# out-of-range slot and request positions, repeated gather positions, odd widths,
# misaligned and strided rows, and malformed token rows for the planner. Needs a GPU and a built extension:
#   pip install -e . && scripts/sanitize.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
if [ ! -x "$SANITIZER" ]; then
    echo "sanitize: no compute-sanitizer at $SANITIZER (set COMPUTE_SANITIZER to its path)" >&2
    exit 2
fi
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "sanitize: needs a CUDA device; nothing was checked" >&2
    exit 2
fi
SCRIPT="$(mktemp --suffix=.py)"
trap 'rm -f "$SCRIPT"' EXIT
cat > "$SCRIPT" <<'PY'
import torch

from lmeye_fast.ops import cuda as ops
from lmeye_fast.planner import plan_slots

dev = "cuda"
for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
    for width in (1, 257, 4095):
        storage = torch.randn(3, 11, width + 1, device=dev, dtype=dtype)
        layouts = (lambda t: t[..., :width], lambda t: t[..., 1:], lambda t: t[..., :width].transpose(0, 1))
        for layout in layouts:  # aligned rows, rows one element off alignment, batch-strided rows
            embeds = layout(storage)
            batch, length = embeds.shape[:2]
            count = min(4, length)
            rows = torch.randn(batch, count, width, device=dev, dtype=dtype, requires_grad=True)
            slot_embed = torch.randn(count, width, device=dev, dtype=dtype, requires_grad=True)
            valid = torch.stack([torch.randperm(length, device=dev)[:count] for _ in range(batch)])
            malformed = valid.clone()
            malformed[:, 0] = -1
            malformed[:, 1] = length + 3
            for slot_pos in (valid, malformed.to(torch.int32)):
                out = ops.interleave(embeds, rows, slot_pos, slot_embed=slot_embed)
                out.backward(torch.randn_like(out))
                ops.interleave(layout(storage.clone()), rows.detach(), slot_pos, inplace=True)
                ops.gather_rows(embeds, slot_pos)
                ops.scatter_rows(rows.detach(), slot_pos, length)
            hidden = embeds.detach().requires_grad_()
            w_q = torch.randn(6, width, device=dev, dtype=dtype, requires_grad=True)
            for request_pos in (valid[:, 0], malformed[:, 1]):
                ops.request(hidden, request_pos, w_q, None, 2).sum().backward()
for length, num_slots in ((0, 2), (1, 1), (37, 3), (2048, 5), (3000, 1500)):
    ids = torch.randint(0, 12, (5, length), device=dev)  # ids 7 and 9 appear at random: every malformed case
    for candidate in (ids, ids.to(torch.int32), ids.t().contiguous().t()):
        plan_slots(candidate, 7, 9, num_slots, backend="cuda")
# Repeated positions: the gather's backward sums them (racecheck would flag a racing update).
seq = torch.randn(2, 9, 300, device=dev, requires_grad=True)
ops.gather_rows(seq, torch.tensor([[2, 2, 5, 2]] * 2, device=dev)).sum().backward()
# The Triton ops, forward and backward, both attention schedules, valid and malformed positions.
from lmeye_fast import InteractiveLayer, StaticVisualMapping
from lmeye_fast.ops.interleave import interleave

for schedule in ("split", "folded"):
    for dtype in (torch.float32, torch.bfloat16):
        layer = InteractiveLayer(96, 40, 64, 5, 2, 4, backend="triton", attention=schedule, device=dev, dtype=dtype)
        mapping = StaticVisualMapping(40, 96, backend="triton", device=dev, dtype=dtype)
        hidden = torch.randn(3, 13, 96, device=dev, dtype=dtype, requires_grad=True)
        image = torch.randn(3, 7, 40, device=dev, dtype=dtype, requires_grad=True)
        mask = torch.rand(3, 7, device=dev) > 0.3
        for slots, request_pos in ((torch.arange(13, 18, device=dev).expand(3, 5), torch.tensor([12, 4, 0], device=dev)),
                                   (torch.tensor([[-1, 13, 40, 14, 15]] * 3, device=dev), torch.tensor([-3, 13, 99], device=dev))):
            embeds = torch.randn(3, 18, 96, device=dev, dtype=dtype, requires_grad=True)
            out = layer(hidden, image, embeds * 1, slots, request_pos=request_pos, image_mask=mask, inplace=True)
            out.float().square().mean().backward()
            mapped = mapping(image, embeds, torch.arange(7, device=dev).expand(3, 7) * (1 if slots.min() >= 0 else -1))
            mapped.float().sum().backward()
            interleave(embeds.detach().clone(), torch.randn(3, 5, 96, device=dev, dtype=dtype), slots, inplace=True)
torch.cuda.synchronize()
print("sanitize: all CUDA and Triton operators ran")
PY
export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # exact allocations, so memcheck sees out-of-bounds accesses
for tool in memcheck racecheck synccheck initcheck; do
  echo "== compute-sanitizer --tool $tool"
  "$SANITIZER" --tool "$tool" --error-exitcode 1 --target-processes all python "$SCRIPT"
done
