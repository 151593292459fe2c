"""Batched multi-LoRA kernel vs the per-adapter loop and lora_delta: forward, grads for x, A and B, Triton on a GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tandem.kernels.lora import lora_delta
from tandem.kernels.multilora import (
    HAS_TRITON,
    multilora_delta,
    multilora_loop,
    plan_segments,
    segment_ids,
    stack_adapters,
)

IN, OUT, R = 24, 20, 4

# name: (n_adapters, per-row adapter ids). Segments are contiguous unless said otherwise.
CASES = {
    "one adapter": (1, segment_ids([37])),
    "even": (4, segment_ids([16, 16, 16, 16])),
    "uneven": (4, segment_ids([5, 40, 1, 17])),
    "empty segments": (5, segment_ids([0, 9, 0, 30, 0])),
    "reused out of order": (3, segment_ids([7, 12, 3, 9], [2, 0, 2, 1])),
    "rows without adapter": (3, torch.tensor([-1, -1, 0, 0, 0, 2, -1, 2, 2, 2, 1, -1])),
    "shuffled": (
        8,
        segment_ids([3, 11, 0, 6, 25, 1, 8, 2])[torch.randperm(56, generator=torch.Generator().manual_seed(1))],
    ),
}


def _weights(n, r=R, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, r, IN, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(n, OUT, r, generator=gen, dtype=dtype).requires_grad_()
    scaling = torch.rand(n, generator=gen, dtype=torch.float64) * 3 + 0.25  # not powers of two
    return a, b, scaling


def _close(got, want, what=""):
    """float32 agreement to 1e-5 relative to the tensor's scale (sums of many terms cancel, so not per element)."""
    atol = 1e-5 * max(1.0, float(want.detach().abs().max())) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


def _grads(fn, x, a, b, seed=2):
    y = fn(x, a, b)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    return (y, *torch.autograd.grad(y, (x, a, b), g))


@pytest.mark.parametrize("tile", [None, 4, 1], ids=["tile=auto", "tile=4", "tile=1"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_loop_forward_and_backward(case, tile):
    n, ids = CASES[case]
    a, b, s = _weights(n)
    x = torch.randn(ids.numel(), IN, generator=torch.Generator().manual_seed(3)).requires_grad_()
    plan = plan_segments(ids, n, tile=tile)
    got = _grads(lambda x, a, b: multilora_delta(x, a, b, s, plan), x, a, b)
    want = _grads(lambda x, a, b: multilora_loop(x, a, b, s, ids), x, a, b)
    for name, u, v in zip(("delta", "grad x", "grad A", "grad B"), got, want):
        _close(u, v, f"{case}, {name}")
    assert torch.all(got[0][ids < 0] == 0)
    for k in range(n):  # adapters without rows get exactly zero gradients
        if not bool((ids == k).any()):
            assert torch.all(got[2][k] == 0) and torch.all(got[3][k] == 0)


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_loop_is_lora_delta_per_adapter(n):
    """The reference itself: each row's delta is kernels/lora.py's lora_delta under its adapter."""
    a, b, s = _weights(n)
    ids = segment_ids([3 + k % 5 for k in range(n)])
    x = torch.randn(ids.numel(), IN)
    want = torch.stack([lora_delta(x[j], a[k], b[k], float(s[k])) for j, k in enumerate(ids.tolist())])
    _close(multilora_loop(x, a, b, s, ids), want, "loop")
    _close(multilora_delta(x, a, b, s, ids), want, "kernel")


@pytest.mark.parametrize("tile", [None, 1, 2, 3, 8])
def test_gradcheck_float64(tile):
    ids = torch.tensor([[0, 0, 2, 2, 2, -1, 0], [1, 1, 1, 1, 2, 2, -1]])  # (B, T) ids for (B, T, in) rows
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    s = [0.5, 1.7, 3.0]
    plan = plan_segments(ids, 3, tile=tile)
    assert torch.autograd.gradcheck(lambda x, a, b: multilora_delta(x, a, b, s, plan), (x, a, b))


def test_gradcheck_float64_contiguous_equal_segments():
    """Equal contiguous segments take the no-copy layout (rows are already the padded buffer)."""
    gen = torch.Generator().manual_seed(0)
    ids = segment_ids([4, 4, 4])
    plan = plan_segments(ids, 3)
    assert plan.identity and plan.one_tile_each
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: multilora_delta(x, a, b, 2.0, plan), (x, a, b))
    _close(multilora_delta(x, a, b, 2.0, plan), multilora_loop(x, a, b, 2.0, ids))


def test_mixed_ranks_by_padding():
    gen = torch.Generator().manual_seed(4)
    ranks = [2, 8, 4]
    pairs = [(torch.randn(r, IN, generator=gen), torch.randn(OUT, r, generator=gen)) for r in ranks]
    scaling = [16 / r for r in ranks]  # alpha / r, as peft
    a, b = stack_adapters(pairs)
    assert a.shape == (3, 8, IN) and b.shape == (3, OUT, 8)
    a.requires_grad_()
    b.requires_grad_()
    ids = segment_ids([10, 0, 7], [2, 0, 1])
    x = torch.randn(ids.numel(), IN, generator=gen)
    y = multilora_delta(x, a, b, scaling, ids)
    want = torch.cat([lora_delta(x[:10], *pairs[2], scaling[2]), lora_delta(x[10:], *pairs[1], scaling[1])])
    _close(y, want)
    ga, gb = torch.autograd.grad(y.square().sum(), (a, b))
    for k, r in enumerate(ranks):  # the padding stays out of the adapter: zero gradients there
        assert torch.all(ga[k, r:] == 0) and torch.all(gb[k, :, r:] == 0)


def test_3d_input_frozen_x_and_bfloat16():
    gen = torch.Generator().manual_seed(5)
    a, b, s = _weights(3)
    x = torch.randn(4, 9, IN, generator=gen)  # (B, T, in), no grad: only A and B get one
    ids = torch.tensor([2, 0, 2, 1])[:, None].expand(4, 9)  # one adapter per sequence
    y = multilora_delta(x, a, b, s, ids)
    assert y.shape == (4, 9, OUT)
    _close(y, multilora_loop(x, a, b, s, ids))
    ga, gb = torch.autograd.grad(y.sum(), (a, b))
    wa, wb = torch.autograd.grad(multilora_loop(x, a, b, s, ids).sum(), (a, b))
    _close(ga, wa, "grad A")
    _close(gb, wb, "grad B")
    xh, ah, bh = x.bfloat16(), a.detach().bfloat16(), b.detach().bfloat16()
    torch.testing.assert_close(multilora_delta(xh, ah, bh, s, ids).float(), y.detach(), rtol=0.05, atol=0.3)


def test_plan_and_edge_cases():
    ids = segment_ids([5, 0, 11], [1, 0, 2])
    plan = plan_segments(ids, 3, tile=4)
    assert plan.tile_adapter.tolist() == [1, 1, 2, 2, 2] and plan.tile_len.tolist() == [4, 1, 4, 4, 3]
    assert plan.tile_start.tolist() == [0, 4, 5, 9, 13]
    whole = plan_segments(segment_ids([4, 4, 4], [2, 0, 1]), 3)  # whole sessions keep their row order
    assert whole.identity and not whole.one_tile_each and whole.tile_adapter.tolist() == [2, 0, 1]
    split = plan_segments(torch.tensor([0, 0, 1, 1, 0, 0]), 2)  # adapter 0 in two runs: rows are sorted
    assert split.order.tolist() == [0, 1, 4, 5, 2, 3] and split.tile_adapter.tolist() == [0, 1]
    a, b, s = _weights(3)
    x = torch.randn(7, IN)
    x[0] = float("nan")  # a row without adapter: its NaN must not reach other rows or the grads
    ids = torch.tensor([-1, 0, 0, 0, 2, 1, 1])
    y = multilora_delta(x, a, b, s, ids)
    assert torch.all(y[0] == 0) and torch.isfinite(y[1:]).all()
    assert all(torch.isfinite(t).all() for t in torch.autograd.grad(y.sum(), (a, b)))
    empty = multilora_delta(torch.zeros(0, IN), a, b, s, torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0, OUT)
    none = multilora_delta(torch.randn(6, IN), a, b, s, torch.full((6,), -1))
    assert torch.all(none == 0)


@pytest.mark.parametrize("bad", ["id too large", "id below -1", "ids vs rows", "scaling count", "shapes", "impl"])
def test_errors_name_the_problem(bad):
    a, b, s = _weights(3)
    x, ids, impl = torch.randn(4, IN), torch.tensor([0, 1, 2, 2]), "auto"
    if bad == "id too large":
        ids = torch.tensor([0, 1, 3, 2])
    elif bad == "id below -1":
        ids = torch.tensor([0, -2, 1, 2])
    elif bad == "ids vs rows":
        ids = torch.tensor([0, 1, 2])
    elif bad == "scaling count":
        s = [1.0, 2.0]
    elif bad == "shapes":
        x = torch.randn(4, IN + 1)
    else:
        impl = "cuda"
    with pytest.raises(ValueError):
        multilora_delta(x, a, b, s, ids, impl=impl)


@pytest.mark.skipif(HAS_TRITON, reason="triton is installed")
def test_triton_impl_without_triton_is_a_clear_error():
    a, b, s = _weights(2)
    with pytest.raises(ValueError, match="triton"):
        multilora_delta(torch.randn(3, IN), a, b, s, torch.tensor([0, 1, 1]), impl="triton")


_TRITON_CHECK = """
import torch
from tandem.kernels.multilora import multilora_delta, multilora_loop, plan_segments, segment_ids
dev = "{dev}"
torch.backends.cuda.matmul.allow_tf32 = False
gen = torch.Generator().manual_seed(0)
for n, lens, in_f, out_f, r in [(1, [40], 48, 40, 8), (5, [9, 0, 70, 1, 33], 96, 80, 16), {last}]:
    ids = segment_ids(lens)
    ids[::7] = -1
    ids = ids[torch.randperm(ids.numel(), generator=gen)].to(dev)
    x = torch.randn(ids.numel(), in_f, generator=gen).to(dev).requires_grad_()
    a = torch.randn(n, r, in_f, generator=gen).to(dev).requires_grad_()
    b = torch.randn(n, out_f, r, generator=gen).to(dev).requires_grad_()
    s = torch.rand(n, generator=gen) + 0.5
    plan = plan_segments(ids, n, tile=16 if dev == "cpu" else None)
    y = multilora_delta(x, a, b, s, plan, impl="triton")
    g = torch.randn(y.shape, generator=gen).to(dev)
    got = (y, *torch.autograd.grad(y, (x, a, b), g))
    yr = multilora_loop(x, a, b, s, ids)
    want = (yr, *torch.autograd.grad(yr, (x, a, b), g))
    for name, u, v in zip(("delta", "grad x", "grad A", "grad B"), got, want):
        atol = 2e-5 * max(1.0, float(v.detach().abs().max()))  # relative to the tensor's scale: sums reorder
        torch.testing.assert_close(u, v, rtol=1e-4, atol=atol, msg=lambda m: f"{{n}} adapters, {{name}}: {{m}}")
    print("ok", n, "adapters")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs a CUDA device and triton")
def test_triton_matches_loop_on_gpu():
    exec(_TRITON_CHECK.format(dev="cuda", last="(16, [128] * 16, 576, 192, 8)"), {})  # SmolLM2 sizes


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_in_the_interpreter():
    """The Triton kernels' indexing and masks, run by Triton's CPU interpreter (not the compiler)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run(
        [sys.executable, "-c", _TRITON_CHECK.format(dev="cpu", last="(8, [20] * 8, 80, 40, 8)")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
