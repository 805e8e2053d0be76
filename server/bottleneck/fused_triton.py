"""Fused GPU projection + exact top-k + logsumexp that never writes the [L, V] logits.

A plain `topk(softmax(H Eᵀ))` writes L x V logits and reads them back twice
(logsumexp, top-k); on an H100 that is ~10x the bare matmul. Here:

Pass 1 (one Triton kernel, one read of E): tiles of H Eᵀ are computed in
registers; each tile updates a running max and sum of exponentials (online
logsumexp), and only the maximum of every SUB consecutive columns is written:
L x V/SUB floats instead of L x V.

Pass 2 (one small kernel, a program per row): the K sub-blocks with the
largest maxima are found.
They hold the exact top-K: the K-th largest sub-block maximum is a lower bound
on the K-th largest logit (K distinct sub-blocks each have an element at least
that large), and every top-K element lies in a sub-block whose maximum is at
least that bound, i.e. among those K sub-blocks (up to exact ties). Their
K x SUB logits are recomputed from those rows of E and the top-K of them is
the answer; the same program turns the split partials into the logsumexp and
writes probabilities and residual mass.

Bytes moved: E once, plus L x V/SUB maxima and L x K x SUB x d gathered
embedding rows; with SUB = 16 and K = 8 that is ~an eighth of E for L = 256.
"""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

from canvaswatch.server.bottleneck.contract import Candidates
from canvaswatch.server.bottleneck.projection import Projection, project_topk_chunked

SUB = 16  # columns summarised by one stored maximum (16 measured best of 16/32/64 on an H100)
LOG2E = tl.constexpr(1.4426950408889634)
_LAUNCH_LOCK = threading.Lock()


def _configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bm, bn, bd, w, s in (
            (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 256, 128, 8, 3),
            (256, 128, 64, 8, 3), (64, 256, 64, 8, 4), (128, 128, 128, 8, 4),
        )
    ]


# Tuned per power-of-two bucket of L, not per exact L: micro-batched launches have many
# different row counts, and re-tuning each would cost seconds.
@triton.autotune(configs=_configs(), key=["L_BUCKET", "D", "V"])
@triton.jit
def _project_reduce(h_ptr, e_ptr, sub_max_ptr, run_max_ptr, run_sum_ptr,
                    L, V, D, cols_per_split, n_sub, stride_h, stride_e, L_BUCKET,
                    scale, softcap,
                    HAS_SOFTCAP: tl.constexpr, SUB_N: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    start = pid_s * cols_per_split
    stop = tl.minimum(start + cols_per_split, V)
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < stop
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            a = tl.load(h_ptr + rows[:, None] * stride_h + dims[None, :],
                        mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
            b = tl.load(e_ptr + cols[:, None] * stride_e + dims[None, :],
                        mask=col_ok[:, None] & (dims[None, :] < D), other=0.0)
            acc = tl.dot(a, tl.trans(b), acc)
        x = acc * scale
        if HAS_SOFTCAP:
            # c * tanh(x / c), written with a sigmoid: tanh(y) = 2 sigmoid(2y) - 1
            x = softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)
        x = tl.where(col_ok[None, :], x, float("-inf"))
        tile_max = tl.max(x, axis=1)
        new_max = tl.maximum(run_max, tile_max)
        # exp(x - m) as exp2((x - m) * log2(e)): the hardware's native exponential
        run_sum = run_sum * tl.exp2((run_max - new_max) * LOG2E) + tl.sum(tl.exp2((x - new_max[:, None]) * LOG2E), axis=1)
        run_max = new_max
        sub = tl.max(tl.reshape(x, [BLOCK_M, BLOCK_N // SUB_N, SUB_N]), axis=2)
        sub_cols = n0 // SUB_N + tl.arange(0, BLOCK_N // SUB_N)
        tl.store(sub_max_ptr + rows[:, None] * n_sub + sub_cols[None, :], sub,
                 mask=row_ok[:, None] & (sub_cols[None, :] * SUB_N < stop))
    tl.store(run_max_ptr + pid_s * L + rows, run_max, mask=row_ok)
    tl.store(run_sum_ptr + pid_s * L + rows, run_sum, mask=row_ok)


@triton.jit
def _select_exact(h_ptr, e_ptr, sub_max_ptr, run_max_ptr, run_sum_ptr,
                  values_ptr, ids_ptr, probs_ptr, residual_ptr, log_z_ptr,
                  L, V, D, n_sub, splits, stride_h, stride_e, scale, softcap,
                  HAS_SOFTCAP: tl.constexpr, K: tl.constexpr, K_BLOCKS: tl.constexpr, SUB_N: tl.constexpr,
                  N_SUB_P2: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr):
    """Pass 2 for one row: logsumexp from the split partials, the top sub-blocks, their exact logits, top-K."""
    row = tl.program_id(0)
    split = tl.arange(0, SPLITS_P2)
    m = tl.load(run_max_ptr + split * L + row, mask=split < splits, other=float("-inf"))
    s = tl.load(run_sum_ptr + split * L + row, mask=split < splits, other=0.0)
    top = tl.max(m, axis=0)
    log_z = top + tl.log(tl.sum(s * tl.exp2((m - top) * LOG2E), axis=0))

    # The K best sub-blocks, in two levels: the same argument as pass 2 itself says they lie in
    # the K groups (of GROUP sub-blocks) with the largest group maxima, so one pass over all
    # maxima and K passes over the group maxima replace K passes over every sub-block.
    sub = tl.arange(0, N_SUB_P2)
    maxima = tl.load(sub_max_ptr + row * n_sub + sub, mask=sub < n_sub, other=float("-inf"))
    group_max = tl.max(tl.reshape(maxima, [N_SUB_P2 // GROUP, GROUP]), axis=1)
    group_ids = tl.arange(0, N_SUB_P2 // GROUP)
    slot = tl.arange(0, K_BLOCKS)
    groups = tl.zeros([K_BLOCKS], tl.int32)
    for j in tl.static_range(K_BLOCKS):
        best = tl.argmax(group_max, axis=0)
        groups = tl.where(slot == j, best, groups)
        group_max = tl.where(group_ids == best, float("-inf"), group_max)
    members = tl.reshape(groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :], [K_BLOCKS * GROUP])
    member_max = tl.load(sub_max_ptr + row * n_sub + members, mask=members < n_sub, other=float("-inf"))
    member_slot = tl.arange(0, K_BLOCKS * GROUP)
    blocks = tl.zeros([K_BLOCKS], tl.int32)
    for j in tl.static_range(K_BLOCKS):
        best = tl.argmax(member_max, axis=0)
        blocks = tl.where(slot == j, tl.sum(tl.where(member_slot == best, members, 0), axis=0), blocks)
        member_max = tl.where(member_slot == best, float("-inf"), member_max)

    cols = blocks[:, None] * SUB_N + tl.arange(0, SUB_N)[None, :]  # [K_BLOCKS, SUB]
    col_ok = cols < V
    acc = tl.zeros([K_BLOCKS, SUB_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        h = tl.load(h_ptr + row * stride_h + dims, mask=dims < D, other=0.0).to(tl.float32)
        e = tl.load(e_ptr + cols[:, :, None] * stride_e + dims[None, None, :],
                    mask=col_ok[:, :, None] & (dims[None, None, :] < D), other=0.0)
        acc += tl.sum(e.to(tl.float32) * h[None, None, :], axis=2)
    x = acc * scale
    if HAS_SOFTCAP:
        x = softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)
    x = tl.reshape(tl.where(col_ok, x, float("-inf")), [K_BLOCKS * SUB_N])
    flat_cols = tl.reshape(cols, [K_BLOCKS * SUB_N])
    position = tl.arange(0, K_BLOCKS * SUB_N)
    kept = 0.0
    for j in tl.static_range(K):
        best = tl.argmax(x, axis=0)
        value = tl.max(x, axis=0)
        token = tl.sum(tl.where(position == best, flat_cols, 0), axis=0)
        prob = tl.exp2((value - log_z) * LOG2E)
        kept += prob
        tl.store(values_ptr + row * K + j, value)
        tl.store(ids_ptr + row * K + j, token)
        tl.store(probs_ptr + row * K + j, prob)
        x = tl.where(position == best, float("-inf"), x)
    tl.store(residual_ptr + row, tl.maximum(1.0 - kept, 0.0))
    tl.store(log_z_ptr + row, log_z)


def _splits(rows: int, vocab: int, device: torch.device) -> int:
    # Enough programs to fill every SM a few times over; each split a multiple of 256 columns.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = max(1, -(-rows // 128))
    return max(1, min(vocab // 2048, -(-4 * sms // row_blocks)))


def fused_topk(hidden: torch.Tensor, embeddings: torch.Tensor, k: int,
               projection: Projection = Projection()) -> Candidates:
    """Exact top-k of softcap(scale * H Eᵀ) with full-vocabulary probabilities, for H [L, d] on CUDA.

    values float32 logits, sorted; ids int32; probs [L, k] float32 and residual [L], normalised
    over the full vocabulary in the kernel; log_z [L].
    """
    L, D = hidden.shape
    V = embeddings.shape[0]
    k = min(k, V)
    hidden = hidden.contiguous()
    n_sub = -(-V // SUB)
    k_blocks = triton.next_power_of_2(k)  # a superset of K sub-blocks is still exact
    group = min(32, triton.next_power_of_2(n_sub))
    if triton.next_power_of_2(n_sub) // group < k_blocks:
        # A vocabulary this small has fewer groups than blocks to pick: the chunked path is exact and cheap.
        chunked = project_topk_chunked(hidden, embeddings, k, projection)
        values, ids, log_z = chunked.values, chunked.ids, chunked.log_z
        probs = torch.exp(values - log_z.unsqueeze(-1))
        return Candidates(values, ids.to(torch.int32), log_z, probs=probs,
                          residual=(1 - probs.sum(-1)).clamp_min(0))
    splits = _splits(L, V, hidden.device)
    cols_per_split = -(-V // splits // 256) * 256
    splits = -(-V // cols_per_split)
    sub_max = torch.empty(L, n_sub, device=hidden.device, dtype=torch.float32)
    run_max = torch.empty(splits, L, device=hidden.device, dtype=torch.float32)
    run_sum = torch.empty(splits, L, device=hidden.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(L, meta["BLOCK_M"]), splits)

    with _LAUNCH_LOCK:  # the autotuner is not thread-safe; launches serialise on the stream anyway
        _project_reduce[grid](
            hidden, embeddings, sub_max, run_max, run_sum,
            L, V, D, cols_per_split, n_sub, hidden.stride(0), embeddings.stride(0), triton.next_power_of_2(L),
            float(projection.scale), float(projection.softcap or 1.0),
            HAS_SOFTCAP=projection.softcap > 0, SUB_N=SUB,
        )
    values = torch.empty(L, k, device=hidden.device, dtype=torch.float32)
    ids = torch.empty(L, k, device=hidden.device, dtype=torch.int32)
    probs = torch.empty(L, k, device=hidden.device, dtype=torch.float32)
    residual = torch.empty(L, device=hidden.device, dtype=torch.float32)
    log_z = torch.empty(L, device=hidden.device, dtype=torch.float32)
    _select_exact[(L,)](
        hidden, embeddings, sub_max, run_max, run_sum, values, ids, probs, residual, log_z,
        L, V, D, n_sub, splits, hidden.stride(0), embeddings.stride(0),
        float(projection.scale), float(projection.softcap or 1.0),
        HAS_SOFTCAP=projection.softcap > 0, K=k, K_BLOCKS=k_blocks, SUB_N=SUB,
        N_SUB_P2=triton.next_power_of_2(n_sub), SPLITS_P2=triton.next_power_of_2(splits), BLOCK_D=64,
        GROUP=group,
        num_warps=8,
    )
    return Candidates(values, ids, log_z, probs=probs, residual=residual)
