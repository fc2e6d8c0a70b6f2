#!/usr/bin/env bash
# Runs the lmeye_fast CUDA operators under compute-sanitizer (memcheck,
# racecheck, synccheck, initcheck) on valid and malformed input: out-of-range
# slot and request positions, odd widths, misaligned and strided rows, and
# malformed token rows for the planner. Needs a GPU and a built extension:
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
torch.cuda.synchronize()
print("sanitize: all CUDA operators ran")
PY
export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # exact allocations, so memcheck sees out-of-bounds accesses
for tool in memcheck racecheck synccheck initcheck; do
  echo "== compute-sanitizer --tool $tool"
  "$SANITIZER" --tool "$tool" --error-exitcode 1 --target-processes all python "$SCRIPT"
done
