"""Mixed precision (histomap.training.device, histomap.train.optimiser_step): bf16 autocast on
CUDA where the GPU computes bf16 natively, fp16 with a gradient scaler where it does not. Both
paths run here on the CPU (CPU autocast takes both dtypes; ``torch.amp.GradScaler("cpu")`` is
the CUDA scaler's logic) and are compared with fp32 on tiny models within bounds derived from
the dtype's unit roundoff and the computation (first-order rounding analysis, below), not read
off one machine.

Rounding model (u = eps / 2 of the autocast dtype, u32 of fp32): autocast rounds each operand
of a matmul to the low-precision dtype (relative error u each), the products are accumulated in
fp32 (CPU and CUDA GEMMs alike: at most n * u32 relative to sum|terms| for n terms) and the
result is rounded to the low-precision dtype (u). So for y = W x + b

    |y_amp - y| <= (2u + n u32) |W| |x| + u |b| + u |y|     (to first order in u),

ReLU is 1-Lipschitz (an error passes through it unamplified), and an error dx in a layer's input
adds |W| dx. Multiplying by a power of two (the loss scale) is exact.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from histomap.train import (TrainConfig, amp_dtype, autocast, fit, grad_scaler, optimiser_step,
                            resolve_device)
from histomap.training import device as device_mod

CPU = torch.device("cpu")
SLACK = 1.05  # second-order terms (products of roundoffs, u^2) are below this by far


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def linear_bound(w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor,
                 dx: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact output, error bound) of x @ w.T + b under autocast ``dtype`` when x already
    carries an error of at most ``dx`` (float64 for the analysis itself)."""
    u, u32 = unit_roundoff(dtype), unit_roundoff(torch.float32)
    w, x = w.double(), x.double()
    y = x @ w.T + (b.double() if b is not None else 0.0)
    mag = x.abs() @ w.abs().T
    err = (2 * u + w.shape[1] * u32) * mag + u * y.abs()
    if b is not None:
        err = err + u * b.double().abs()
    if dx is not None:
        err = err + (1 + u) * (dx.double() @ w.abs().T)
    return y, err


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_forward_under_autocast_within_the_rounding_bound(dtype):
    model = mlp()
    x = torch.randn(16, 32)
    with torch.no_grad():
        ref = model(x)
        with autocast(CPU, dtype):
            out = model(x)
    assert out.dtype == dtype  # autocast really ran in the low precision
    lin1, lin2 = model[0], model[2]
    with torch.no_grad():
        pre, dpre = linear_bound(lin1.weight, lin1.bias, x, None, dtype)
        _, dy = linear_bound(lin2.weight, lin2.bias, pre.clamp_min(0), dpre, dtype)
    diff = (out.double() - ref.double()).abs()
    assert (diff <= SLACK * dy).all(), float((diff / dy).max())
    # autocast changed the numbers (else the bound would test nothing)
    assert (diff > 0).any()


def linear_grad_bound(w, b, x, t, dtype):
    """(exact dL/dW, bound) for L = mean((W x + b - t)^2) with the forward and backward under
    autocast ``dtype`` (mse_loss itself runs in fp32 under autocast)."""
    u, u32 = unit_roundoff(dtype), unit_roundoff(torch.float32)
    y, dy = linear_bound(w, b, x, None, dtype)
    n = y.numel()
    g_y = 2 * (y - t.double()) / n
    dg_y = 2 * dy / n + u * g_y.abs() + u * (2 * dy / n)   # fp32 loss, then cast to ``dtype``
    xd = x.double()
    g_w = g_y.T @ xd
    # backward matmul: operands rounded (2u), fp32 accumulation over the batch, result rounded
    err = dg_y.T @ xd.abs() + (2 * u + x.shape[0] * u32) * (g_y.abs().T @ xd.abs()) \
        + u * g_w.abs()
    return g_w, err


def _linear_and_data(grad_size: float = 1.0):
    torch.manual_seed(1)
    lin = nn.Linear(24, 6)
    x = torch.randn(32, 24)
    with torch.no_grad():
        t = lin(x) + grad_size * torch.randn(32, 6)   # residuals of size grad_size
    return lin, x, t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gradients_through_the_scaler_within_the_rounding_bound(dtype):
    """One optimiser_step as fit takes it: bf16 with a disabled scaler, fp16 with an enabled
    one (loss x 2^16, gradients unscaled before clipping): the gradients the optimiser sees
    equal fp32's within the bound, and the step moves the weights as SGD with those gradients."""
    lin, x, t = _linear_and_data()
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    scaler = grad_scaler(CPU, dtype)
    assert scaler.is_enabled() == (dtype == torch.float16)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with autocast(CPU, dtype):
        loss = nn.functional.mse_loss(lin(x), t)
    assert optimiser_step(loss, lin, opt, scaler, grad_clip=1e6)  # clip: unscale_ first
    exact, bound = linear_grad_bound(w0, b0, x, t, dtype)
    grad = lin.weight.grad.double()
    assert (grad - exact).abs().le(SLACK * bound).all()
    assert torch.allclose(lin.weight.detach(), w0 - 0.1 * lin.weight.grad, rtol=0, atol=1e-7)


def test_fp16_gradients_underflow_without_the_scaler_and_not_with_it():
    """Why fp16 needs the scaler: gradients of 1e-9 are below fp16's smallest subnormal (6e-8)
    and vanish unscaled; scaled by 2^16 they survive and unscale to fp32's within the bound."""
    lin, x, t = _linear_and_data(grad_size=1e-3)
    weight = 1e-6  # a small loss term, as a regulariser's
    exact, bound = linear_grad_bound(lin.weight.detach(), lin.bias, x, t, torch.float16)
    exact, bound = exact * weight, bound * weight
    assert float(exact.abs().max()) < 6e-8 * 32
    grads = {}
    for enabled in (False, True):
        lin.zero_grad()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, enabled=enabled)
        with autocast(CPU, torch.float16):
            loss = weight * nn.functional.mse_loss(lin(x), t)
        scaler.scale(loss).backward()
        scaler.unscale_(torch.optim.SGD(lin.parameters(), lr=0.0))
        grads[enabled] = lin.weight.grad.double().clone()
    assert float((grads[False] - exact).abs().max()) > float(exact.abs().max()) * 0.5  # lost
    assert (grads[True] - exact).abs().le(SLACK * bound).all()


def test_scaler_skips_an_overflowed_step_and_halves_its_scale():
    lin, x, t = _linear_and_data()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    scaler = grad_scaler(CPU, torch.float16)
    scale0 = scaler.get_scale()
    before = [p.detach().clone() for p in lin.parameters()]
    # an injected inf in one gradient: the whole step is skipped, the scale halves
    hook = lin.weight.register_hook(lambda g: torch.full_like(g, math.inf))
    with autocast(CPU, torch.float16):
        loss = nn.functional.mse_loss(lin(x), t)
    assert optimiser_step(loss, lin, opt, scaler, grad_clip=1.0) is False
    assert scaler.get_scale() == scale0 / 2
    assert all(torch.equal(p, q) for p, q in zip(lin.parameters(), before))
    hook.remove()
    # the next clean step is taken with unscaled, clipped gradients
    opt.zero_grad(set_to_none=True)
    with autocast(CPU, torch.float16):
        loss = nn.functional.mse_loss(lin(x), t)
    assert optimiser_step(loss, lin, opt, scaler, grad_clip=1.0) is True
    assert scaler.get_scale() == scale0 / 2
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in lin.parameters()))
    assert float(norm) <= 1.0 + 1e-3   # clipped after unscaling (scaled it would be ~2^15)
    assert not all(torch.equal(p, q) for p, q in zip(lin.parameters(), before))


def test_disabled_scaler_is_a_plain_step():
    lin, x, t = _linear_and_data()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    scaler = grad_scaler(CPU, None)
    assert not scaler.is_enabled()
    loss = nn.functional.mse_loss(lin(x), t)
    w0 = lin.weight.detach().clone()
    assert optimiser_step(loss, lin, opt, scaler) is True
    assert torch.allclose(lin.weight.detach(), w0 - 0.1 * lin.weight.grad, rtol=0, atol=1e-7)


def test_amp_dtype_picks_bf16_only_where_native(monkeypatch):
    """CUDA: bf16 on compute capability >= 8 (native), fp16 below it, where
    torch.cuda.is_bf16_supported() says yes for the slow emulated bf16 too."""
    cuda = torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    for major, expected in ((7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None, m=major: (m, 0))
        assert amp_dtype(cuda) == expected
        assert grad_scaler.__module__ == device_mod.__name__
    assert amp_dtype(cuda, enabled=False) is None
    assert amp_dtype(CPU) is None and amp_dtype(CPU, cpu_bf16=True) == torch.bfloat16
    assert resolve_device("cpu") == CPU


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 3, generator=torch.Generator().manual_seed(99))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fit_trains_under_each_autocast_dtype(tmp_path, monkeypatch, dtype):
    """fit's own path with the dtype a GPU would pick (forced on the CPU): it learns as fp32
    does, and the fp16 scaler's state goes into last.pt."""
    import histomap.train as train_mod

    results = {}
    for name, forced in (("fp32", None), ("amp", dtype)):
        monkeypatch.setattr(train_mod, "amp_dtype", lambda *a, f=forced, **k: f)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        out = tmp_path / name
        summary = fit(model, _Pairs(64, 0), _Pairs(16, 1), loss_fn=nn.functional.mse_loss,
                      out_dir=out, cfg=TrainConfig(epochs=10, batch_size=8, lr=3e-2,
                                                   patience=10, seed=0))
        results[name] = summary
        scaler_state = torch.load(out / "last.pt", weights_only=True)["scaler"]
        assert bool(scaler_state) == (forced == torch.float16)
    # both learn: the best validation loss is well below the first epoch's training loss
    first = results["fp32"]["history"][0]["train_loss"]
    for summary in results.values():
        assert summary["best_val_loss"] < 0.9 * first
