"""Launch-config sweep of the Triton path at the LMEye-7B shape (bf16).

Times every candidate config of each kernel by CUDA-graph replay (20 calls per
graph, divided by 20, median of 30 replays), checks each candidate against a
float32 reference (bf16 error <= 2x the bf16 reference's error + 2^-8 scale),
then times the whole layer (graph + eager wall; forward+backward with the image
frozen, as LMEye's vision encoder is) with the winners in both attention
schedules, and prints the CONFIGS dict to paste into
lmeye_fast/ops/triton_launch.py, and which schedule's forward+backward was faster (what
``attention="auto"`` in lmeye_fast/ops/__init__.py should follow).

Run from the repository root on a GPU:  python benchmarks/tune_triton.py
"""

import statistics
import sys
import time

import torch

from lmeye_fast import InteractiveLayer, reference
from lmeye_fast.ops import attend as at
from lmeye_fast.ops import attend_folded as af
from lmeye_fast.ops import request as rq
from lmeye_fast.ops import transmit as tr
from lmeye_fast.ops import triton_launch as tlm

dev, dt = "cuda", torch.bfloat16
B, T, D, Dv, N, Di, R, H, S = 32, 512, 4096, 1024, 257, 768, 5, 12, 1
CALLS, REPLAYS = 20, 30
T0 = time.time()


def graph_us(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(REPLAYS):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000 / CALLS)
    return statistics.median(ts)


def wall_us(fn, iters=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e6


def err_ok(got, ref32, ref_bf):
    e = (got.float() - ref32).abs().max().item()
    bound = 2 * (ref_bf.float() - ref32).abs().max().item() + 2.0 ** -8 * (1 + ref32.abs().max().item())
    return e, bound


torch.manual_seed(0)
rnd = lambda *s, scale=1.0: (torch.randn(*s, device=dev) * scale)  # noqa: E731
hidden = rnd(B, T, D).to(dt)
qpos = torch.randint(0, T - R, (B,), device=dev)
image = rnd(B, N, Dv).to(dt)
w_q, b_q = rnd(R * Di, D, scale=D ** -0.5).to(dt), rnd(R * Di, scale=0.1).to(dt)
w_f, b_f = rnd(S * Di, Dv, scale=Dv ** -0.5).to(dt), rnd(S * Di, scale=0.1).to(dt)
w_o, b_o = rnd(D, Di, scale=Di ** -0.5).to(dt), rnd(D, scale=0.1).to(dt)
slot_e = rnd(R, D, scale=0.1).to(dt)
embeds = rnd(B, T, D).to(dt)
slot = torch.stack([torch.randperm(T, device=dev)[:R] for _ in range(B)])
reqs = reference.request(hidden, qpos, w_q, b_q, R)
f32 = lambda *ts: [t.float() if t is not None else None for t in ts]  # noqa: E731

# References: float32 and bf16 runs of the same math.
ref_req = (reference.request(*f32(hidden), qpos, *f32(w_q, b_q), R), reference.request(hidden, qpos, w_q, b_q, R))


def attend_ref(r, x, wf, bf):
    return reference.attend(r, reference.decompose(x, wf, bf, S), None, H, S)


leaves32 = [t.detach().requires_grad_() for t in f32(reqs, image, w_f, b_f)]
leaves_bf = [t.detach().clone().requires_grad_() for t in (reqs, image, w_f, b_f)]
gz = rnd(B, R, Di).to(dt)
z32 = attend_ref(*leaves32)
z_bf = attend_ref(*leaves_bf)
g32 = torch.autograd.grad(z32, leaves32, gz.float())
g_bf = torch.autograd.grad(z_bf, leaves_bf, gz)
t32 = reference.interleave(embeds.float(), reference.transmit(*f32(reqs, w_o, b_o, slot_e)), slot)
t_bf = reference.interleave(embeds, reference.transmit(reqs, w_o, b_o, slot_e), slot)

CANDIDATES = {
    "attend_fwd": [dict(SPLIT=sp, HEADS=h, BN=bn, BK=bk, num_warps=w, num_stages=s) for sp, h, bn, bk, w, s in [
        (0, 1, 64, 64, 4, 3), (0, 2, 64, 64, 4, 3), (1, 1, 64, 64, 4, 3), (1, 2, 64, 64, 4, 3),
        (1, 4, 64, 64, 8, 3), (1, 1, 128, 64, 4, 3), (1, 2, 128, 64, 8, 3), (1, 1, 32, 64, 4, 3),
        (1, 2, 32, 64, 4, 3), (1, 4, 32, 64, 4, 3), (1, 1, 64, 64, 8, 3)]],
    "attend_bwd": [dict(SPLIT=sp, HEADS=h, BN=bn, BK=bk, num_warps=w, num_stages=s) for sp, h, bn, bk, w, s in [
        (0, 2, 64, 64, 4, 2), (1, 1, 64, 64, 4, 2), (1, 2, 64, 64, 4, 2), (1, 2, 32, 64, 4, 2),
        (1, 4, 64, 64, 8, 2), (1, 1, 32, 64, 4, 2), (1, 4, 32, 64, 4, 2), (1, 1, 64, 64, 8, 2),
        (1, 2, 64, 64, 8, 2)]],
    # The folded schedule's kernels share one config; each candidate is timed forward + backward.
    "attend_folded": [dict(BM=bm, BE=be, BG=bg, BN=bn, BV=bv, BK=bk, num_warps=w, num_stages=s)
                      for bm, be, bg, bn, bv, bk, w, s in [
        (32, 64, 64, 32, 64, 64, 8, 3), (32, 64, 64, 32, 64, 64, 8, 2), (32, 64, 64, 32, 64, 32, 8, 4),
        (32, 32, 32, 32, 64, 64, 4, 3), (64, 64, 64, 32, 128, 64, 8, 3), (16, 64, 64, 16, 64, 64, 4, 3),
        (32, 64, 64, 64, 64, 64, 8, 3)]],
    "request_fwd": [dict(BN=bn, BK=bk, num_warps=w, num_stages=s) for bn, bk, w, s in [
        (16, 128, 4, 3), (16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4), (32, 256, 8, 3),
        (64, 256, 8, 3)]],
    "transmit_fwd": [dict(BN=bn, BK=bk, num_warps=w, num_stages=s) for bn, bk, w, s in [
        (32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3)]],
}

attn_state = {}


def run_kernel(name):
    """(call for timing, call returning [(label, got, ref32, ref_bf)] for checking)."""
    if name == "request_fwd":
        fn = lambda: rq.request_fwd(hidden, qpos, w_q, b_q)  # noqa: E731
        return fn, lambda: [("r", fn().view(B, R, Di), *ref_req)]
    if name == "attend_fwd":
        fn = lambda: at.attend_fwd(reqs, image, None, w_f, b_f, H, S)  # noqa: E731
        return fn, lambda: [("z", fn()[0], z32, z_bf)]
    if name == "attend_bwd":
        _, lse, feats = attn_state["fwd"]
        fn = lambda: at.attend_bwd(gz, reqs, image, None, w_f, b_f, lse, feats, H, S)  # noqa: E731

        def check():
            got = fn()
            return [(lab, got[i], g32[i], g_bf[i]) for i, lab in enumerate(("d r", "d X", "d W_f", "d b_f"))]
        return fn, check
    if name == "attend_folded":
        def fn():
            z, probs, q, u, sums = af.attend_folded_fwd(reqs, image, None, w_f, b_f, H, S)
            return (z,) + af.attend_folded_bwd(gz, reqs, image, w_f, b_f, probs, q, u, sums, H, S)

        def check():
            got = fn()
            return [("z", got[0], z32, z_bf)] + [(lab, got[i + 1], g32[i], g_bf[i])
                                                 for i, lab in enumerate(("d r", "d X", "d W_f", "d b_f"))]
        return fn, check
    scratch = embeds.clone()
    fn = lambda: tr.transmit_interleave_inplace(reqs, w_o, b_o, slot_e, scratch, slot)  # noqa: E731

    def check():
        out = embeds.clone()
        tr.transmit_interleave_inplace(reqs, w_o, b_o, slot_e, out, slot)
        return [("E", out, t32, t_bf)]
    return fn, check


print(f"{'kernel':<13} {'config':<58} {'us':>7}  check")
best = {}
for name, cands in CANDIDATES.items():
    if name == "attend_bwd":
        tlm.set_config("attend_fwd", best.get("attend_fwd", (0, tlm.CONFIGS["attend_fwd"]))[1])
        attn_state["fwd"] = at.attend_fwd(reqs, image, None, w_f, b_f, H, S)
    for cfg in cands:
        label = ",".join(f"{k}={v}" for k, v in cfg.items())
        try:
            tlm.set_config(name, cfg)
            fn, check = run_kernel(name)
            bad = []
            for lab, got, ref32, ref_bf in check():
                e, bound = err_ok(got, ref32, ref_bf)
                if not (e <= bound):
                    bad.append(f"{lab} err {e:.2e} > {bound:.2e}")
            us = graph_us(fn)
            status = "ok" if not bad else "WRONG " + "; ".join(bad)
            print(f"{name:<13} {label:<58} {us:7.1f}  {status}")
            if not bad and (name not in best or us < best[name][0]):
                best[name] = (us, cfg)
        except Exception as exc:  # one failing candidate must not stop the sweep
            print(f"{name:<13} {label:<58} {'-':>7}  FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
        sys.stdout.flush()
    if name in best:
        tlm.set_config(name, best[name][1])
        try:
            print(f"{name:<13} eager wall per call (best config) {wall_us(run_kernel(name)[0]):7.1f} us")
        except Exception as exc:
            print(f"{name:<13} eager wall FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")

print(f"-- sweep {time.time() - T0:.0f} s; whole layer with the winners:")
layer = InteractiveLayer(D, Dv, Di, R, S, H, backend="triton", device=dev, dtype=dt)
with torch.no_grad():
    for p in layer.parameters():
        p.normal_(0, 0.02)


def fwd():
    with torch.no_grad():
        layer(hidden, image, embeds, slot, request_pos=qpos, inplace=True)


hg = hidden.clone().requires_grad_()
eg = embeds.clone().requires_grad_()
gout = torch.randn_like(embeds)
params = list(layer.parameters())


def fwd_bwd():
    # The image features come from a frozen vision encoder (LMEye's setting): no gradient.
    out = layer(hg, image, eg * 1, slot, request_pos=qpos)
    torch.autograd.grad(out, [hg, eg] + params, gout)


# Both attention schedules with their winning configs; the faster forward+backward is printed last.
schedule_us = {}
for folded in (0, 1):
    layer.attention = "folded" if folded else "split"
    for label, fn in (("layer fwd", fwd), ("layer fwd+bwd", fwd_bwd)):
        for kind, timer in (("GPU graph", graph_us), ("eager wall", wall_us)):
            try:
                us = timer(fn)
                print(f"{label:<14} {'folded' if folded else 'split':<7} {kind:<11} {us:8.1f} us")
                if label == "layer fwd+bwd" and kind == "GPU graph":
                    schedule_us[folded] = us
            except Exception as exc:
                print(f"{label:<14} {kind:<11} FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            sys.stdout.flush()
if schedule_us:
    faster = "folded" if min(schedule_us, key=schedule_us.get) else "split"
    print(f"faster attention schedule (layer fwd+bwd, GPU graph): {faster}")

print("best per kernel:", {k: round(v[0], 1) for k, v in best.items()})
print("CONFIGS = {")
for name in tlm.CONFIGS:
    print(f"    {name!r}: {dict(best[name][1]) if name in best else tlm.CONFIGS[name]!r},")
print("}")
print(f"-- total {time.time() - T0:.0f} s")
