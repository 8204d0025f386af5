"""The layer-input Hessian and its inverse factor on small random inputs."""

from __future__ import annotations

import os

import pytest
import torch

from slimformer.calibrate.hessian_math import FP64_MAX_WIDTH, accumulate_hessian, gram, inverse_hessian_factor
from slimformer.models.placement import peak_memory


def test_hessian_running_mean_equals_batch() -> None:
    x = torch.randn(300, 16)
    h_all, _ = accumulate_hessian(None, x, 0)
    h, n = None, 0
    for chunk in x.split(70):
        h, n = accumulate_hessian(h, chunk, n)
    assert n == 300 and torch.allclose(h, h_all, atol=1e-5)
    assert torch.allclose(h_all, 2 * x.T @ x / 300, atol=1e-5)


# the two precisions: fp64 (inputs up to FP64_MAX_WIDTH) and fp32 in place (wider; forced here)
PRECISIONS = pytest.mark.parametrize("max_width", [FP64_MAX_WIDTH, 0], ids=["fp64", "fp32-in-place"])


@PRECISIONS
def test_inverse_factor_inverts_the_damped_hessian_and_survives_dead_inputs(max_width: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(200, 12)
    x[:, 3] = 0  # an input that never fires: its diagonal entry is 0 until the factor sets it to 1
    h, _ = accumulate_hessian(None, x, 0)
    u = inverse_hessian_factor(h, damp=0.01, fp64_max_width=max_width).double()
    fixed = h.double().clone()
    fixed[3, 3] = 1.0
    damped = fixed + 0.01 * torch.diag(fixed).mean() * torch.eye(12, dtype=torch.float64)
    assert torch.allclose(u.T @ u @ damped, torch.eye(12, dtype=torch.float64), atol=1e-4)
    assert torch.equal(u, torch.triu(u)) and bool((torch.diag(u) > 0).all())
    # the factor GPTQ's reference takes (Cholesky of the explicit inverse), which it replaces
    reference = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    assert torch.allclose(u, reference, rtol=1e-4, atol=1e-6)


@PRECISIONS
def test_inverse_factor_matches_the_explicit_inverse_on_correlated_inputs(max_width: int) -> None:
    """Strongly correlated inputs (as real activations are): the factor agrees with the Cholesky
    factor of the explicit fp64 inverse to 1e-4 relative, in fp32 too (measured 4e-6 fp32)."""
    torch.manual_seed(1)
    x = torch.randn(2048, 256) @ torch.randn(256, 256) + 0.01 * torch.randn(2048, 256)
    h, _ = accumulate_hessian(None, x, 0)
    u = inverse_hessian_factor(h, damp=0.01, fp64_max_width=max_width).double()
    damped = h.double() + 0.01 * torch.diag(h.double()).mean() * torch.eye(256, dtype=torch.float64)
    reference = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    assert (u - reference).abs().max() <= 1e-4 * reference.abs().max()


@PRECISIONS
def test_inverse_factor_in_an_order_is_the_factor_of_the_permuted_hessian(max_width: int) -> None:
    """With `order` (GPTQ's act-order), the factor is bit for bit that of H permuted first, dead
    inputs included: the gather only moves where the copy is made."""
    torch.manual_seed(2)
    x = torch.randn(300, 40) * torch.rand(40)
    x[:, 5] = 0
    h, _ = accumulate_hessian(None, x, 0)
    order = torch.argsort(torch.diag(h), descending=True)
    assert torch.equal(inverse_hessian_factor(h, 0.01, order, max_width),
                       inverse_hessian_factor(h[order][:, order], 0.01, fp64_max_width=max_width))


def test_inputs_wider_than_the_fp64_limit_factor_in_fp32() -> None:
    """The width rule: fp64 up to the limit (a contiguous fp32 result), fp32 above it (a
    column-major view of the one copy); both the same factor to fp32 rounding."""
    torch.manual_seed(4)
    x = torch.randn(400, 64) @ torch.randn(64, 64)
    h, _ = accumulate_hessian(None, x, 0)
    narrow, wide = inverse_hessian_factor(h, 0.01, fp64_max_width=64), inverse_hessian_factor(h, 0.01, fp64_max_width=63)
    assert narrow.is_contiguous() and wide.mT.is_contiguous() and not wide.is_contiguous()
    assert (narrow - wide).abs().max() <= 1e-4 * narrow.abs().max()


def _factor_peak_mb(fp64_max_width: int, n: int = 3072) -> tuple[float, torch.Tensor]:
    """(MB the act-order factor of an n-wide H adds to the resident peak over the caller's, the
    factor). 3072 wide: 36-72 MB a matrix, above glibc's largest mmap threshold, so every one is
    its own mapping and counts in the resident peak."""
    torch.manual_seed(3)
    x = torch.randn(n + 64, n)
    h = x.T @ x / x.shape[0]
    del x
    order = torch.argsort(torch.diag(h), descending=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = peak_memory()["peak_rss_bytes"]  # VmHWM on Linux
    u = inverse_hessian_factor(h, 0.01, order, fp64_max_width)
    return (peak_memory()["peak_rss_bytes"] - before) / 2**20, u


NEEDS_PEAK_RESET = pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                                      reason="needs Linux's resettable peak RSS")


@NEEDS_PEAK_RESET
def test_inverse_factor_keeps_at_most_two_fp64_matrices_alive() -> None:
    """The factor's peak memory: at most ~2 (in, in) fp64 matrices over what the caller holds
    (each step writes over the one before; three were alive before, plus a permuted fp32 copy of H,
    1.6 GB more on Llama-3-8B's down_proj)."""
    extra, u = _factor_peak_mb(FP64_MAX_WIDTH)
    matrix_mb = u.numel() * 8 / 2**20
    extra -= u.numel() * 4 / 2**20  # the fp32 result
    assert extra <= 2.3 * matrix_mb, f"{extra:.0f} MB over the caller's, {matrix_mb:.0f} MB a matrix"


@NEEDS_PEAK_RESET
def test_wide_inverse_factor_is_computed_in_the_memory_of_its_one_copy() -> None:
    """Above the fp64 width the factor's peak is the one fp32 copy it returns (Cholesky, inverse and
    upper Cholesky all write over it): Llama-3-8B's down_proj needs 0.8 GB beside its Hessian, not
    3.3 GB. It fails if any step copies the matrix (row-major `out=` does: 2.0 matrices)."""
    extra, u = _factor_peak_mb(0)
    matrix_mb = u.numel() * 4 / 2**20
    assert u.dtype == torch.float32
    assert extra <= 1.5 * matrix_mb, f"{extra:.0f} MB over the caller's, {matrix_mb:.0f} MB an fp32 matrix"


@pytest.mark.parametrize("width", [7, 130, 576, 1000])
def test_gram_from_the_upper_triangle_equals_the_full_product(width: int) -> None:
    """The block-triangular x^T x equals the full product to fp32 rounding, and is exactly
    symmetric once split in blocks (widths below, at and past two 128-column blocks, one not
    divisible by 4)."""
    x = torch.randn(512, width)
    g = gram(x)
    assert torch.equal(g, g.t()) or width < 256
    assert torch.allclose(g, x.t() @ x, rtol=1e-5, atol=1e-3)
