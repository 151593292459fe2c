"""Batched multi-LoRA: a different LoRA per segment of rows in one pass (Punica's SGMV idea), forward and backward."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # Optional: the GPU path needs triton, the CPU path only torch.
    import triton
    import triton.language as tl
except ImportError:
    triton = None

HAS_TRITON = triton is not None
IMPLS = ("auto", "torch", "triton")
# Rows per tile of the Triton kernels (their BLOCK_M). A power of two >= 16, as tl.dot needs.
TRITON_TILE = 32
# CPU tile policy, measured with bench/multilora_bench.py --variants [--skew] (1 thread, SmolLM2 sizes).
# Even segments: padding each segment to the longest and one torch.bmm over segments beat fixed
# tiles of 32 rows by 1.2-1.7x, and gathering A and B per row for a bmm over rows by 5-35x.
# Uneven segments (1..256 rows): padding to the longest wasted ~2x rows and ran ~1.5x slower than
# tiles of 128 rows. So: pad to the longest unless that exceeds PAD_WASTE x the rows, else tiles.
PAD_WASTE = 1.5
CPU_TILE = 128


@dataclass(frozen=True)
class SegmentPlan:
    """Where each row goes: rows grouped by adapter, cut into tiles of at most `tile` rows of one adapter.

    Built once per batch by `plan_segments` and reusable by every LoRA layer that sees the same rows.

    Attributes:
        n_rows: N, the rows of the batch (including rows with no adapter).
        n_adapters: how many adapters the stacked weights hold.
        tile: rows per tile.
        order: (M,) the rows that have an adapter, grouped by adapter (row order kept when it already is).
        tile_adapter: (n_tiles,) adapter of each tile.
        tile_start: (n_tiles,) offset of each tile's first row in `order`.
        tile_len: (n_tiles,) rows in each tile, 1..tile.
        slot: (N,) position of each row in the padded (n_tiles * tile) layout; 0 for rows with no adapter.
        src: (n_tiles * tile,) the row at each padded position; padding repeats the tile's first row.
        pad_mask: (n_tiles, tile, 1) True at padding positions, or None when there is no padding.
        none_rows: (N - M,) the rows with no adapter.
        identity: rows are already in padded order with no padding: (N, d) is a view of (n_tiles, tile, d).
        one_tile_each: tile i belongs to adapter i, so weights need no gathering.
    """

    n_rows: int
    n_adapters: int
    tile: int
    order: torch.Tensor
    tile_adapter: torch.Tensor
    tile_start: torch.Tensor
    tile_len: torch.Tensor
    slot: torch.Tensor
    src: torch.Tensor
    pad_mask: torch.Tensor | None
    none_rows: torch.Tensor
    identity: bool
    one_tile_each: bool

    @property
    def n_tiles(self) -> int:
        return int(self.tile_adapter.numel())


def segment_ids(
    seg_lens: Sequence[int] | torch.Tensor, seg_adapters: Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """Per-row adapter index for contiguous segments: segment i has seg_lens[i] rows and uses adapter seg_adapters[i] (default i)."""
    lens = torch.as_tensor(seg_lens, dtype=torch.long)
    ads = torch.arange(lens.numel()) if seg_adapters is None else torch.as_tensor(seg_adapters, dtype=torch.long)
    if ads.shape != lens.shape or bool((lens < 0).any()):
        raise ValueError(f"seg_lens must be >= 0 and match seg_adapters; got {lens.tolist()} and {ads.tolist()}")
    return torch.repeat_interleave(ads, lens)  # (N,)


def stack_adapters(adapters: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks [(A (r_i, in), B (out, r_i)), ...] into A (n, r_max, in), B (n, out, r_max), zero-padding ranks.

    The zero rows of A and columns of B add nothing to the delta and get zero gradients.
    """
    if not adapters:
        raise ValueError("stack_adapters needs at least one (A, B) pair")
    r_max = max(a.shape[0] for a, _ in adapters)
    a_out = torch.stack([F.pad(a, (0, 0, 0, r_max - a.shape[0])) for a, _ in adapters])  # (n, r_max, in)
    b_out = torch.stack([F.pad(b, (0, r_max - b.shape[1])) for _, b in adapters])  # (n, out, r_max)
    return a_out, b_out


def plan_segments(ids: torch.Tensor, n_adapters: int, tile: int | None = None) -> SegmentPlan:
    """Builds the SegmentPlan for per-row adapter indices.

    A segment is a run of rows of one adapter. When each adapter's rows are already contiguous (a
    batch made of whole sessions) they keep their order; otherwise rows are sorted by adapter.

    Args:
        ids: adapter index of each row, any shape (flattened to N rows), in [-1, n_adapters);
            -1 means the row gets no LoRA (its delta is zero).
        n_adapters: number of stacked adapters.
        tile: rows per tile; None picks TRITON_TILE for CUDA rows when triton is present, else the
            CPU policy (pad to the longest segment unless that wastes over PAD_WASTE x the rows).
    """
    ids = ids.reshape(-1).long()
    n = ids.numel()
    dev = ids.device
    if n and (int(ids.min()) < -1 or int(ids.max()) >= n_adapters):
        raise ValueError(f"adapter ids must lie in [-1, {n_adapters}); got [{int(ids.min())}, {int(ids.max())}]")
    order = (ids >= 0).nonzero().squeeze(1)  # (M,) rows with an adapter, in row order
    seg_ad, seg_len = torch.unique_consecutive(ids[order], return_counts=True)  # (S,) runs
    if seg_ad.numel() != torch.unique(seg_ad).numel():  # some adapter's rows are split: sort them together
        order = order[torch.argsort(ids[order], stable=True)]
        seg_ad, seg_len = torch.unique_consecutive(ids[order], return_counts=True)
    m, n_segs = order.numel(), seg_ad.numel()
    if tile is None:
        if ids.is_cuda and HAS_TRITON:
            tile = TRITON_TILE
        else:
            longest = int(seg_len.max()) if n_segs else 1
            tile = longest if longest * n_segs <= PAD_WASTE * m else CPU_TILE
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    seg_start = torch.cumsum(seg_len, 0) - seg_len  # (S,) offsets into order
    tiles = (seg_len + tile - 1) // tile  # (S,)
    first_tile = torch.cumsum(tiles, 0) - tiles  # (S,)
    n_tiles = int(tiles.sum())
    tile_seg = torch.repeat_interleave(torch.arange(n_segs, device=dev), tiles, output_size=n_tiles)  # (n_tiles,)
    k = torch.arange(n_tiles, device=dev) - first_tile[tile_seg]  # (n_tiles,) tile index within its segment
    tile_adapter = seg_ad[tile_seg]
    tile_start = seg_start[tile_seg] + k * tile
    tile_len = torch.clamp(seg_len[tile_seg] - k * tile, max=tile)
    row_seg = torch.repeat_interleave(torch.arange(n_segs, device=dev), seg_len, output_size=m)  # (M,)
    slot = torch.zeros(n, dtype=torch.long, device=dev)
    slot[order] = first_tile[row_seg] * tile + torch.arange(m, device=dev) - seg_start[row_seg]
    pos = tile_start[:, None] + torch.arange(tile, device=dev)  # (n_tiles, tile) index into order
    pos = torch.where(pos < (tile_start + tile_len)[:, None], pos, tile_start[:, None])
    src = order[pos].reshape(-1)  # (n_tiles * tile,)
    pad_mask = (torch.arange(tile, device=dev) >= tile_len[:, None]).unsqueeze(2)  # (n_tiles, tile, 1)
    pad_mask = pad_mask if bool(pad_mask.any()) else None
    none_rows = (ids < 0).nonzero().squeeze(1)  # (N - M,)
    identity = pad_mask is None and m == n and bool(torch.equal(slot, torch.arange(n, device=dev)))
    one_tile_each = n_tiles == n_adapters and bool(torch.equal(tile_adapter, torch.arange(n_adapters, device=dev)))
    return SegmentPlan(
        n,
        n_adapters,
        tile,
        order,
        tile_adapter,
        tile_start,
        tile_len,
        slot,
        src,
        pad_mask,
        none_rows,
        identity,
        one_tile_each,
    )


# -- torch implementation: pad rows into (n_tiles, tile, ...) and batch the matmuls over tiles ---------------


def _pad(x: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """(N, d) -> (n_tiles, tile, d), each tile's rows in place; padding holds copies of a real row (masked later)."""
    if plan.identity:
        return x.view(plan.n_tiles, plan.tile, x.shape[1])
    return x.index_select(0, plan.src).view(plan.n_tiles, plan.tile, x.shape[1])


def _unpad(y: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """(n_tiles, tile, d) -> (N, d) in row order; rows without an adapter get zeros."""
    if plan.identity:
        return y.view(-1, y.shape[2])
    if plan.n_tiles == 0:  # no row has an adapter
        return y.new_zeros(plan.n_rows, y.shape[2])
    out = y.view(-1, y.shape[2]).index_select(0, plan.slot)  # (N, d)
    return out.index_fill_(0, plan.none_rows, 0) if plan.none_rows.numel() else out


def _scaled(v: torch.Tensor, s: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """v (n_tiles, tile, r) times each tile's scaling, in place, with padding rows set to exactly 0."""
    v.mul_(_per_tile(s, plan).view(-1, 1, 1))
    return v if plan.pad_mask is None else v.masked_fill_(plan.pad_mask, 0)


def _per_tile(w: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """Adapter-indexed (n, ...) -> tile-indexed (n_tiles, ...)."""
    return w if plan.one_tile_each else w.index_select(0, plan.tile_adapter)


def _per_adapter(wt: torch.Tensor, like: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """Tile-indexed (n_tiles, ...) sums -> adapter-indexed like `like`; adapters without rows get zeros."""
    return wt if plan.one_tile_each else torch.zeros_like(like).index_add_(0, plan.tile_adapter, wt)


def _torch_forward(x, a, b, s, plan):
    xp = _pad(x, plan)  # (T, tile, in)
    vs = _scaled(torch.bmm(xp, _per_tile(a, plan).transpose(1, 2)), s, plan)  # (T, tile, r), zero on padding
    return _unpad(torch.bmm(vs, _per_tile(b, plan).transpose(1, 2)), plan), vs  # (N, out)


def _torch_backward(g, x, a, b, s, vs, plan, needs):
    # Padding rows of vs and gv are 0, so the padded copies in gp and xp add nothing to A's and B's grads.
    gp = _pad(g, plan)  # (T, tile, out)
    gx = ga = gb = None
    if needs[2]:
        gb = _per_adapter(torch.bmm(vs.transpose(1, 2), gp).transpose(1, 2), b, plan)  # (n, out, r) = s * g^T v
    if needs[0] or needs[1]:
        gv = _scaled(torch.bmm(gp, _per_tile(b, plan)), s, plan)  # (T, tile, r) = s * g B
        if needs[1]:
            ga = _per_adapter(torch.bmm(gv.transpose(1, 2), _pad(x, plan)), a, plan)  # (n, r, in)
        if needs[0]:
            gx = _unpad(torch.bmm(gv, _per_tile(a, plan)), plan)  # (N, in)
    return gx, ga, gb


# -- Triton implementation (GPU) -------------------------------------------------------------------------
# UNTESTED ON A GPU: written on a machine without one. Triton's CPU interpreter (TRITON_INTERPRET=1)
# has run these kernels against the loop (tests/test_multilora.py), which checks their indexing,
# masks and arithmetic, but they have never been compiled for or timed on a GPU. The check to run
# where one is: pytest -m gpu tests/test_multilora.py, then bench/multilora_bench.py --device cuda.

if HAS_TRITON:

    @triton.jit
    def _tile_rows(order_ptr, tile_start_ptr, tile_len_ptr, tile_ad_ptr, BLOCK_M: tl.constexpr):
        """This program's tile: its row indices (BM,), their mask and its adapter."""
        t = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < tl.load(tile_len_ptr + t)
        rows = tl.load(order_ptr + tl.load(tile_start_ptr + t) + offs_m, mask=m_mask, other=0).to(tl.int64)
        return rows, m_mask, tl.load(tile_ad_ptr + t).to(tl.int64)

    @triton.jit
    def _sgmv_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        scale_ptr,
        order_ptr,
        tile_start_ptr,
        tile_len_ptr,
        tile_ad_ptr,
        K,
        N_OUT,
        stride_xm,
        stride_xk,
        stride_wa,
        stride_wn,
        stride_wk,
        stride_om,
        stride_on,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """out[rows] = scale[a] * x[rows] @ w[a].T for one tile's rows (adapter a). Untested on a GPU (see above)."""
        rows, m_mask, ad = _tile_rows(order_ptr, tile_start_ptr, tile_len_ptr, tile_ad_ptr, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N_OUT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < K
            xt = tl.load(
                x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )  # (BM, BK)
            wt = tl.load(
                w_ptr + ad * stride_wa + offs_n[None, :] * stride_wn + k[:, None] * stride_wk,
                mask=k_mask[:, None] & n_mask[None, :],
                other=0.0,
            )  # (BK, BN)
            if IEEE:
                acc += tl.dot(xt, wt, input_precision="ieee")
            else:
                acc += tl.dot(xt, wt)
        acc = acc * tl.load(scale_ptr + ad)
        tl.store(
            out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on,
            acc.to(out_ptr.dtype.element_ty),
            mask=m_mask[:, None] & n_mask[None, :],
        )

    @triton.jit
    def _sgmv_wgrad_kernel(
        g_ptr,
        x_ptr,
        out_ptr,
        scale_ptr,
        order_ptr,
        tile_start_ptr,
        tile_len_ptr,
        tile_ad_ptr,
        P,
        Q,
        stride_gm,
        stride_gp,
        stride_xm,
        stride_xq,
        stride_ot,
        stride_op,
        stride_oq,
        BLOCK_M: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """out[t] = scale[a] * g[rows].T @ x[rows], tile t's share of a weight gradient. Untested on a GPU (see above)."""
        rows, m_mask, ad = _tile_rows(order_ptr, tile_start_ptr, tile_len_ptr, tile_ad_ptr, BLOCK_M)
        offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        p_mask = offs_p < P
        q_mask = offs_q < Q
        gt = tl.load(
            g_ptr + rows[:, None] * stride_gm + offs_p[None, :] * stride_gp,
            mask=m_mask[:, None] & p_mask[None, :],
            other=0.0,
        )  # (BM, BP)
        xt = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_q[None, :] * stride_xq,
            mask=m_mask[:, None] & q_mask[None, :],
            other=0.0,
        )  # (BM, BQ)
        if IEEE:
            acc = tl.dot(tl.trans(gt), xt, input_precision="ieee")  # (BP, BQ)
        else:
            acc = tl.dot(tl.trans(gt), xt)
        acc = acc * tl.load(scale_ptr + ad)
        tl.store(
            out_ptr
            + tl.program_id(0).to(tl.int64) * stride_ot
            + offs_p[:, None] * stride_op
            + offs_q[None, :] * stride_oq,
            acc,
            mask=p_mask[:, None] & q_mask[None, :],
        )


def _block(n: int, cap: int = 64) -> int:
    """A power-of-two block in [16, cap] that covers n if it can (tl.dot needs >= 16)."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def _ieee(x: torch.Tensor) -> bool:
    """float32 matmuls in IEEE precision unless torch itself allows TF32 (as F.linear would); other dtypes as they are."""
    return x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _sgmv(x, w, scale, plan, n_out):
    """(N, K) rows times w[a].T for w (n, n_out, K) (any strides) -> (N, n_out); rows without adapter stay 0."""
    out = x.new_zeros(x.shape[0], n_out)
    if plan.n_tiles:
        bn, bk = _block(n_out), _block(x.shape[1])
        _sgmv_kernel[(plan.n_tiles, triton.cdiv(n_out, bn))](
            x,
            w,
            out,
            scale,
            plan.order,
            plan.tile_start,
            plan.tile_len,
            plan.tile_adapter,
            x.shape[1],
            n_out,
            *x.stride(),
            *w.stride(),
            *out.stride(),
            BLOCK_M=plan.tile,
            BLOCK_N=bn,
            BLOCK_K=bk,
            IEEE=_ieee(x),
        )
    return out


def _sgmv_wgrad(g, x, scale, plan, n_adapters):
    """Per adapter a: scale[a] * sum over its rows of g[row].T x[row] -> (n_adapters, P, Q) for g (N, P), x (N, Q)."""
    p, q = g.shape[1], x.shape[1]
    part = torch.zeros(plan.n_tiles, p, q, dtype=torch.float32, device=g.device)  # (T, P, Q)
    if plan.n_tiles:
        bp, bq = _block(p), _block(q)
        _sgmv_wgrad_kernel[(plan.n_tiles, triton.cdiv(p, bp), triton.cdiv(q, bq))](
            g,
            x,
            part,
            scale,
            plan.order,
            plan.tile_start,
            plan.tile_len,
            plan.tile_adapter,
            p,
            q,
            *g.stride(),
            *x.stride(),
            *part.stride(),
            BLOCK_M=plan.tile,
            BLOCK_P=bp,
            BLOCK_Q=bq,
            IEEE=_ieee(g),
        )
    grad = torch.zeros(n_adapters, p, q, dtype=torch.float32, device=g.device)
    return grad.index_add_(0, plan.tile_adapter, part).to(g.dtype)


def _triton_forward(x, a, b, s, plan):
    s32 = s.float()
    v = _sgmv(x, a, torch.ones_like(s32), plan, a.shape[1])  # (N, r)
    return _sgmv(v, b, s32, plan, b.shape[1]), v  # (N, out), scaling after B as peft


def _triton_backward(g, x, a, b, s, v, plan, needs):
    s32, ones = s.float(), torch.ones_like(s, dtype=torch.float32)
    gx = ga = gb = None
    if needs[2]:
        gb = _sgmv_wgrad(g, v, s32, plan, b.shape[0])  # (n, out, r)
    if needs[0] or needs[1]:
        gv = _sgmv(g, b.transpose(1, 2), s32, plan, b.shape[2])  # (N, r) = scale * g @ B[a]
        if needs[1]:
            ga = _sgmv_wgrad(gv, x, ones, plan, a.shape[0])  # (n, r, in)
        if needs[0]:
            gx = _sgmv(gv, a.transpose(1, 2), ones, plan, a.shape[2])  # (N, in) = gv @ A[a]
    return gx, ga, gb


# -- the operator ----------------------------------------------------------------------------------------

_BACKENDS = {"torch": (_torch_forward, _torch_backward), "triton": (_triton_forward, _triton_backward)}


class MultiLoRAFunction(torch.autograd.Function):
    """delta[row] = scaling[a] * B[a] @ A[a] @ x[row], a = the row's adapter; explicit backward for x, A and B."""

    @staticmethod
    def forward(ctx, x, a, b, scaling, plan, impl):
        y, v = _BACKENDS[impl][0](x, a, b, scaling, plan)
        ctx.save_for_backward(x, a, b, scaling, v)
        ctx.plan, ctx.impl = plan, impl
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, a, b, scaling, v = ctx.saved_tensors
        needs = ctx.needs_input_grad
        gx, ga, gb = _BACKENDS[ctx.impl][1](g.contiguous(), x, a, b, scaling, v, ctx.plan, needs)
        return gx, ga, gb, None, None, None


def _check(x, a, b, scaling, ids_or_plan, impl):
    """Validates shapes, dtypes and ids; returns the scaling vector (n,) and the plan."""
    if (
        a.dim() != 3
        or b.dim() != 3
        or b.shape[0] != a.shape[0]
        or b.shape[2] != a.shape[1]
        or x.shape[-1] != a.shape[2]
    ):
        raise ValueError(
            f"expected x (..., in), A (n, r, in), B (n, out, r); got {list(x.shape)}, {list(a.shape)}, {list(b.shape)}"
        )
    if not (x.dtype == a.dtype == b.dtype) or not (x.device == a.device == b.device):
        raise ValueError(
            f"x, A and B must share dtype and device; got {x.dtype}/{a.dtype}/{b.dtype} on {x.device}/{a.device}/{b.device}"
        )
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {IMPLS}")
    n = a.shape[0]
    s_dtype = (
        torch.float64 if x.dtype == torch.float64 else torch.float32
    )  # half types scale in float32, as a Python float would
    s = torch.as_tensor(scaling, dtype=s_dtype, device=x.device).reshape(-1)
    if s.numel() not in (1, n):
        raise ValueError(f"scaling has {s.numel()} values for {n} adapters")
    plan = ids_or_plan if isinstance(ids_or_plan, SegmentPlan) else plan_segments(ids_or_plan.to(x.device), n)
    if plan.n_adapters != n or plan.order.device != x.device or plan.n_rows != x.numel() // x.shape[-1]:
        raise ValueError(
            f"ids (or plan) for {plan.n_rows} rows of {plan.n_adapters} adapters on {plan.order.device}; "
            f"x has {x.numel() // x.shape[-1]} rows, the weights {n} adapters, on {x.device}"
        )
    return s.expand(n).contiguous(), plan


def multilora_delta(
    x: torch.Tensor,  # (..., in)
    a: torch.Tensor,  # (n, r, in)
    b: torch.Tensor,  # (n, out, r)
    scaling: float | Sequence[float] | torch.Tensor,
    ids: torch.Tensor | SegmentPlan,
    impl: str = "auto",
) -> torch.Tensor:
    """Returns the LoRA delta of every row under its own adapter, in one batched pass.

    Row j of x (x flattened to (N, in)) with adapter a = ids[j] gets
    scaling[a] * B[a](A[a](x[j])), as `lora_delta` in kernels/lora.py; rows with id -1 get zeros.
    Equal to the per-adapter loop up to float rounding: the batched matmuls may round differently
    from F.linear, and the torch path scales the rank-r intermediate rather than the output (72x
    fewer multiplies at SmolLM2 sizes; exact for power-of-two scalings such as alpha/r = 2, 1, 0.5).
    Differentiable in x, A and B (scaling is a constant).
    Dropout, if any, is the caller's: pass the dropped-out x.

    Args:
        x: input rows (..., in), e.g. (N, in) or (B, T, in).
        a: stacked A weights (n, r, in); mixed ranks zero-padded to the largest (`stack_adapters`).
        b: stacked B weights (n, out, r).
        scaling: one float for all adapters or one per adapter (n,).
        ids: adapter of each row, shape x.shape[:-1] (or any shape with N elements, e.g. from
            `segment_ids`), or a SegmentPlan from `plan_segments` to reuse across layers.
        impl: "torch" (vectorised torch ops, any device), "triton" (CUDA; needs triton; not yet
            run on a GPU, see the Triton section) or "auto" (triton for CUDA tensors when triton
            is installed, torch otherwise).

    Returns:
        The delta, (..., out).
    """
    s, plan = _check(x, a, b, scaling, ids, impl)
    if impl == "auto":
        impl = "triton" if (x.is_cuda and HAS_TRITON) else "torch"
    if impl == "triton":
        if not HAS_TRITON:
            raise ValueError("impl='triton' needs the triton package; use impl='torch'")
        if plan.tile not in (16, 32, 64, 128):
            raise ValueError(f"the triton kernels need a tile of 16, 32, 64 or 128 rows; the plan has {plan.tile}")
    x2 = x.reshape(-1, a.shape[2]).contiguous()  # (N, in)
    y = MultiLoRAFunction.apply(x2, a.contiguous(), b.contiguous(), s, plan, impl)  # (N, out)
    return y.view(*x.shape[:-1], b.shape[1])


def multilora_loop(
    x: torch.Tensor,  # (..., in)
    a: torch.Tensor,  # (n, r, in)
    b: torch.Tensor,  # (n, out, r)
    scaling: float | Sequence[float] | torch.Tensor,
    ids: torch.Tensor,
) -> torch.Tensor:
    """Reference: one `lora_delta` per adapter over that adapter's rows (gathered by index), plain autograd.

    Same contract as `multilora_delta` (ids per row, -1 for none); for tests and the benchmark.
    """
    n, _, d_in = a.shape
    s = torch.as_tensor(scaling, dtype=torch.float64).reshape(-1).expand(n).tolist()
    x2 = x.reshape(-1, d_in)  # (N, in)
    ids = ids.reshape(-1).to(x.device)
    rows, deltas = [], []
    for k in range(n):
        idx = (ids == k).nonzero().squeeze(1)  # (n_k,)
        if idx.numel():
            rows.append(idx)
            deltas.append(F.linear(F.linear(x2.index_select(0, idx), a[k]), b[k]) * s[k])  # (n_k, out)
    out = x2.new_zeros(x2.shape[0], b.shape[1])
    if rows:
        out = out.index_copy(0, torch.cat(rows), torch.cat(deltas))
    return out.view(*x.shape[:-1], b.shape[1])
