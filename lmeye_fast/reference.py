"""The LMEye math in plain PyTorch (docs/design.md §2).

This module is the single source of truth: every Triton and CUDA kernel is
tested against it, and the benchmarks use it as the eager / torch.compile
baseline. It runs on any device and in any dtype; every product and sum is
accumulated in float32 (float64 inputs stay float64), and each op's result is
cast back to the storage dtype of its inputs, as a fused kernel would store it.

Shapes: B batch, T sequence, D LLM width, N image tokens, Dv vision width,
S sub-features per image token, Di interaction width, H heads, R requests,
K slots (K = R with the shared transmission, a multiple of R per slot).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .checks import check_schedule

__all__ = [
    "compute_dtype",
    "gather_rows",
    "request",
    "decompose",
    "attention_weights",
    "attend",
    "attend_decomposed",
    "slot_groups",
    "transmit",
    "interleave",
    "transmit_interleave",
    "static_map",
    "interactive",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_rows(hidden: torch.Tensor, request_pos: torch.Tensor) -> torch.Tensor:
    """``hidden[b, request_pos[b]]`` for every row b, as an index gather (no host sync). A position
    outside ``[0, T)`` reads a zero row, as the kernels read it."""
    batch, length = hidden.shape[0], hidden.shape[1]
    if length == 0:
        return hidden.new_zeros((batch, hidden.shape[2]))
    inside = (request_pos >= 0) & (request_pos < length)
    rows = hidden[torch.arange(batch, device=hidden.device), request_pos.clamp(0, length - 1)]
    return torch.where(inside[:, None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


def request(
    hidden: torch.Tensor,
    request_pos: Optional[torch.Tensor],
    w_q: torch.Tensor,
    b_q: Optional[torch.Tensor],
    num_requests: int,
) -> torch.Tensor:
    """Step 1: ``r_b = reshape(W_q · h[b, q_b] + b_q, (R, Di))``.

    ``hidden`` is (B, T, D) with ``request_pos`` (B,), or already the request
    hidden vectors (B, D) with ``request_pos=None``. Returns (B, R, Di).
    """
    h = hidden if request_pos is None else gather_rows(hidden, request_pos)
    acc = compute_dtype(h.dtype)
    r = F.linear(h.to(acc), w_q.to(acc), None if b_q is None else b_q.to(acc))
    return r.reshape(h.shape[0], num_requests, w_q.shape[0] // num_requests).to(h.dtype)


def decompose(
    image: torch.Tensor, w_f: torch.Tensor, b_f: Optional[torch.Tensor], sub_features: int
) -> torch.Tensor:
    """Step 2: ``F_b = reshape(X_b · W_fᵀ + b_f, (N*S, Di))``; row ``n*S + k`` is sub-feature k of token n."""
    acc = compute_dtype(image.dtype)
    f = F.linear(image.to(acc), w_f.to(acc), None if b_f is None else b_f.to(acc))
    batch, tokens = image.shape[:2]
    return f.reshape(batch, tokens * sub_features, w_f.shape[0] // sub_features).to(image.dtype)


def attention_weights(
    requests: torch.Tensor,
    feats: torch.Tensor,
    image_mask: Optional[torch.Tensor],
    num_heads: int,
    sub_features: int,
) -> torch.Tensor:
    """Step 3's weights: per head ``softmax(r Fᵀ / sqrt(Di/H))`` over the unmasked sub-features, in the
    accumulation dtype, (B, H, R, N*S); column ``n*S + k`` is sub-feature k of image token n.

    ``requests`` (B, R, Di), ``feats`` (B, N*S, Di), ``image_mask`` (B, N) bool
    (True = keep) or None. A masked sub-feature gets weight 0, and a row whose
    image tokens are all masked gets all zeros, never NaN.
    """
    acc = compute_dtype(requests.dtype)
    batch, num_req, width = requests.shape
    head_dim = width // num_heads
    r = requests.to(acc).reshape(batch, num_req, num_heads, head_dim).transpose(1, 2)
    f = feats.to(acc).reshape(batch, feats.shape[1], num_heads, head_dim).transpose(1, 2)
    scores = torch.matmul(r, f.transpose(-1, -2)) / math.sqrt(head_dim)  # (B, H, R, N*S)
    return _masked_softmax(scores, image_mask, sub_features)


def _masked_softmax(scores: torch.Tensor, image_mask: Optional[torch.Tensor], sub_features: int) -> torch.Tensor:
    """The softmax of (B, H, R, N*S) scores over the sub-features of the kept image tokens (column
    ``n*S + k`` is sub-feature k of token n); a row with every token masked is all zeros, never NaN."""
    if image_mask is None:
        return torch.softmax(scores, dim=-1)
    keep = image_mask.to(torch.bool).repeat_interleave(sub_features, dim=1)[:, None, None, :]
    scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)
    p = torch.exp(scores - row_max) * keep
    return p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def attend(
    requests: torch.Tensor,
    feats: torch.Tensor,
    image_mask: Optional[torch.Tensor],
    num_heads: int,
    sub_features: int,
) -> torch.Tensor:
    """Step 3: per head ``softmax(r Fᵀ / sqrt(Di/H)) F + r`` over the unmasked sub-features
    (``attention_weights``).

    ``requests`` (B, R, Di), ``feats`` (B, N*S, Di), ``image_mask`` (B, N) bool
    (True = keep) or None. A row whose image tokens are all masked gets
    ``z = r``: its attention contributes exactly zero, never NaN.
    """
    acc = compute_dtype(requests.dtype)
    batch, num_req, width = requests.shape
    if feats.shape[1] == 0:  # no image tokens: nothing to attend to, as if all were masked
        return requests.clone()
    attn = attention_weights(requests, feats, image_mask, num_heads, sub_features)
    f = feats.to(acc).reshape(batch, feats.shape[1], num_heads, width // num_heads).transpose(1, 2)
    z = torch.matmul(attn, f).transpose(1, 2).reshape(batch, num_req, width) + requests.to(acc)
    return z.to(requests.dtype)


def _attend_folded(requests, image, image_mask, w_f, b_f, num_heads, sub_features) -> torch.Tensor:
    """``attend(requests, decompose(image, w_f, b_f, S), ...)`` in the folded association (docs/design.md
    §5): per head h and sub-feature k, ``r_h · F_(n,k),h = (r_h W_kh) · X_n + r_h · b_kh`` and
    ``Σ A F = (Σ A X) W_khᵀ + (Σ A) b_kh``, so F is never formed. The same math rounded otherwise."""
    acc = compute_dtype(requests.dtype)
    batch, num_req, width = requests.shape
    tokens = image.shape[1]
    if tokens == 0:
        return requests.clone()
    head_dim = width // num_heads
    r = requests.to(acc).reshape(batch, num_req, num_heads, head_dim)
    w = w_f.to(acc).reshape(sub_features, num_heads, head_dim, w_f.shape[1])
    x = image.to(acc)
    pulled = torch.einsum("brhd,khdv->bhrkv", r, w)
    scores = torch.einsum("bhrkv,bnv->bhrnk", pulled, x)
    if b_f is not None:
        bias = b_f.to(acc).reshape(sub_features, num_heads, head_dim)
        scores = scores + torch.einsum("brhd,khd->bhrk", r, bias)[:, :, :, None, :]
    flat = scores.reshape(batch, num_heads, num_req, tokens * sub_features) / math.sqrt(head_dim)
    weights = _masked_softmax(flat, image_mask, sub_features).reshape(scores.shape)  # (B, H, R, N, S)
    z = torch.einsum("bhrkv,khdv->brhd", torch.einsum("bhrnk,bnv->bhrkv", weights, x), w)
    if b_f is not None:
        z = z + torch.einsum("bhrk,khd->brhd", weights.sum(3), bias)
    return (z.reshape(batch, num_req, width) + requests.to(acc)).to(requests.dtype)


def attend_decomposed(
    requests: torch.Tensor,
    image: torch.Tensor,
    image_mask: Optional[torch.Tensor],
    w_f: torch.Tensor,
    b_f: Optional[torch.Tensor],
    num_heads: int,
    sub_features: int,
    schedule="auto",
) -> torch.Tensor:
    """Steps 2-3 as one op: ``attend(requests, decompose(image, w_f, b_f, S), image_mask, H, S)``.

    ``schedule`` (a name of ``checks.ATTENTION_SCHEDULES`` or an ``AttentionSchedule``) picks the
    association the products are taken in, as the Triton schedule of that name takes them: ``"split"``
    and ``"auto"`` form F first; ``"folded"`` pulls the requests through W_f and never forms F (tile
    options change no association). The math is the same; the rounding differs, which is what a test
    of a kernel against two correct implementations reads.
    """
    if check_schedule(schedule).name == "folded":
        return _attend_folded(requests, image, image_mask, w_f, b_f, num_heads, sub_features)
    feats = decompose(image, w_f, b_f, sub_features)
    return attend(requests, feats, image_mask, num_heads, sub_features)


def slot_groups(num_requests: int, num_slots: int) -> int:
    """How many consecutive slots read each request in the per-slot transmission: ``K // R``, which
    must divide exactly (slot j reads request ``j // (K // R)``)."""
    if num_requests < 1 or num_slots % num_requests:
        raise ValueError(f"w_o (K, D, Di): the slot count K = {num_slots} must be a multiple of the request "
                         f"count R = {num_requests} (z is (B, R, Di))")
    return num_slots // num_requests


def transmit(
    z: torch.Tensor, w_o: torch.Tensor, b_o: Optional[torch.Tensor], slot_embed: Optional[torch.Tensor]
) -> torch.Tensor:
    """Step 4: the transmitted slot tokens.

    Shared (``w_o`` (D, Di), ``b_o`` (D,), ``slot_embed`` (R, D)):
    ``t_b = z_b · W_oᵀ + b_o + e_slot`` -> (B, R, D).

    Per slot (``w_o`` (K, D, Di), ``b_o`` (K, D), ``slot_embed`` (K, D), K a multiple of R):
    ``t_(b,j) = W_o[j] · z_(b, j // (K/R)) + b_o[j] + e_slot[j]`` -> (B, K, D). ``w_o`` is the
    (K·D, Di) weight of one linear layer viewed as (K, D, Di): its row ``j·D + d`` is ``w_o[j, d]``.
    """
    acc = compute_dtype(z.dtype)
    if w_o.dim() == 2:
        t = F.linear(z.to(acc), w_o.to(acc), None if b_o is None else b_o.to(acc))
    else:
        batch, num_req = z.shape[:2]
        num_slots, width = w_o.shape[:2]
        groups = slot_groups(num_req, num_slots)
        weight = w_o.to(acc).reshape(num_req, groups, width, w_o.shape[2])  # (R, K/R, D, Di)
        t = torch.einsum("bri,rgdi->brgd", z.to(acc), weight).reshape(batch, num_slots, width)
        if b_o is not None:
            t = t + b_o.to(acc)
    if slot_embed is not None:
        t = t + slot_embed.to(acc)
    return t.to(z.dtype)


def interleave(
    embeds: torch.Tensor, rows: torch.Tensor, slot_pos: torch.Tensor, inplace: bool = False
) -> torch.Tensor:
    """Step 5: ``E[b, s[b, j]] += t[b, j]``; every other row of E is untouched.

    ``embeds`` (B, T', D), ``rows`` (B, K, D), ``slot_pos`` (B, K) distinct per
    row. The sum is formed in float32 and rounded once to E's dtype. A position
    outside ``[0, T')`` (such as the -1 the planner gives a malformed row) is
    skipped, as every kernel skips it, and its row's gradient is zero.
    """
    out = embeds if inplace else embeds.clone()
    batch, num_slots = slot_pos.shape
    length = embeds.shape[1]
    if batch * num_slots == 0 or length == 0:
        return out
    inside = (slot_pos >= 0) & (slot_pos < length)
    pos = slot_pos.clamp(0, length - 1)
    acc = compute_dtype(embeds.dtype)
    rows_in = torch.where(inside[..., None], rows.to(acc), torch.zeros((), dtype=acc, device=rows.device))
    summed = (out[torch.arange(batch, device=embeds.device)[:, None], pos].to(acc) + rows_in).to(out.dtype)
    # A skipped slot cannot simply be left out without a host sync, so it writes too: at the row's
    # first valid slot, with that slot's own (detached) value, a repeat of one write that neither
    # races nor counts a gradient twice. A row with no valid slot rewrites its first (clamped)
    # position with its own value.
    column = torch.arange(num_slots, device=slot_pos.device).expand(batch, num_slots)
    target = torch.where(inside, column, inside.to(torch.uint8).argmax(1, keepdim=True))
    repeat = summed.detach().gather(1, target[..., None].expand_as(summed))
    values = torch.where((target == column)[..., None], summed, repeat)
    out[torch.arange(batch, device=embeds.device)[:, None], pos.gather(1, target)] = values
    return out


def transmit_interleave(
    z: torch.Tensor,
    w_o: torch.Tensor,
    b_o: Optional[torch.Tensor],
    slot_embed: Optional[torch.Tensor],
    embeds: torch.Tensor,
    slot_pos: torch.Tensor,
    inplace: bool = False,
) -> torch.Tensor:
    """Steps 4-5 as one op: ``interleave(embeds, transmit(z, w_o, b_o, slot_embed), slot_pos)``, the
    transmitted rows in E's dtype."""
    rows = transmit(z, w_o, b_o, slot_embed)
    return interleave(embeds, rows.to(embeds.dtype), slot_pos, inplace=inplace)


def static_map(
    image: torch.Tensor,
    w_1: torch.Tensor,
    b_1: Optional[torch.Tensor],
    w_2: Optional[torch.Tensor] = None,
    b_2: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Static visual mapping ``P_b = X_b · W_sᵀ + b_s``, or a two-layer GELU MLP when ``w_2`` is given."""
    acc = compute_dtype(image.dtype)
    p = F.linear(image.to(acc), w_1.to(acc), None if b_1 is None else b_1.to(acc))
    if w_2 is not None:
        p = F.linear(F.gelu(p), w_2.to(acc), None if b_2 is None else b_2.to(acc))
    return p.to(image.dtype)


def interactive(
    hidden: torch.Tensor,
    request_pos: Optional[torch.Tensor],
    image: torch.Tensor,
    image_mask: Optional[torch.Tensor],
    embeds: torch.Tensor,
    slot_pos: torch.Tensor,
    w_q: torch.Tensor,
    b_q: Optional[torch.Tensor],
    w_f: torch.Tensor,
    b_f: Optional[torch.Tensor],
    w_o: torch.Tensor,
    b_o: Optional[torch.Tensor],
    slot_embed: Optional[torch.Tensor],
    num_heads: int,
    sub_features: int,
    inplace: bool = False,
) -> torch.Tensor:
    """The whole IPN (steps 1-5) with the attention interaction; ``w_o`` (D, Di) is the shared
    transmission (``slot_pos`` (B, R)), (K, D, Di) the per-slot one (``slot_pos`` (B, K))."""
    num_requests = w_q.shape[0] // w_o.shape[-1]
    r = request(hidden, request_pos, w_q, b_q, num_requests)
    z = attend_decomposed(r, image, image_mask, w_f, b_f, num_heads, sub_features)
    return transmit_interleave(z, w_o, b_o, slot_embed, embeds, slot_pos, inplace=inplace)
