"""The parity rule every kernel test applies, for outputs and gradients alike.

Inputs (and the upstream gradient) are drawn in the low dtype; the kernel and the
reference run in that dtype are both measured against the reference run in float64 on
the same values:

  kernel_err = max |kernel - ref64|,  ref_err = max |reference in dtype - ref64|
  kernel_err <= 2 * ref_err + floor,  floor = c * max |ref64|

c = 2^-18 (float32), 2^-11 (float16), 2^-8 (bfloat16): about one rounding of the
largest value in fp16/bf16, which covers outputs the low-precision reference happens
to get exact. In float32 the reference's error is a few ulps and varies from draw to
draw, and the attention backward passes through a softmax whose gradient cancels
(p·(dp - Σ p·dp) for a nearly one-hot row), amplified by the size of the scores; two
fp32 summation orders then differ by up to about ten ulps of the largest value on some
draws, hence 32 ulps (2^-18) there, 400 times tighter than a 1e-4 relative bound.
"""

import torch

FLOOR = {torch.float32: 2.0 ** -18, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def max_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    return (a.double() - ref64).abs().max().item() if ref64.numel() else 0.0


def assert_close(name: str, got: torch.Tensor, ref64: torch.Tensor, ref_low: torch.Tensor, dtype: torch.dtype):
    """``got`` against the float64 reference ``ref64``; ``ref_low`` is the reference run in ``dtype``."""
    assert got.dtype == ref_low.dtype, f"{name}: dtype {got.dtype}, expected {ref_low.dtype}"
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    top = ref64.abs().max().item() if ref64.numel() else 0.0
    err, ref_err = max_err(got, ref64), max_err(ref_low, ref64)
    limit = 2 * ref_err + FLOOR[dtype] * top
    assert err <= limit, (f"{name}: max error {err:.3e} > {limit:.3e} (reference in {dtype}: {ref_err:.3e}, "
                          f"max |ref| {top:.3e})")
