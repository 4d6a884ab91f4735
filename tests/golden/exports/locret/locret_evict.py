"""Locret eviction in one Triton kernel: keep the ``keep`` best-scoring cache entries of every (batch row, KV head)
and compact them, in sequence order, into fresh [B, H, keep, ...] buffers.

The torch path (`locret_evict_reference`; ``LocretLayer.evict`` ran the same with ``topk``) ranks with a sort,
sorts the kept indices and runs four gathers (keys, values, scores, positions): a handful of launches and index
tensors per eviction, and one eviction per layer after every prefill chunk. The kernel does it in one launch; each
program owns one (batch row, KV head) and, optionally, one contiguous segment of its entries (see "Splits" below):

1. Ranking keys. Each fp32 score maps to an int32 with the same order (sign-magnitude bits -> two's complement:
   negative floats get their 31 magnitude bits flipped; -0.0 is first folded onto +0.0, as a float comparison
   treats them equal). The newest ``protect_newest`` entries rank as +inf, in registers only: the stored scores
   are left unchanged and are what the output holds.
2. Threshold. The exact ``keep``-th largest key T = max{t : #(key >= t) >= keep}, by a 5-way bisection of the
   int32 range: every pass counts the entries >= each of 4 evenly spaced pivots at once (a [tile, 4] comparison
   accumulated per lane, reduced once per pass), keeps the highest pivot whose count still reaches ``keep`` and
   narrows the interval 5x; 14 passes over the (L2-resident) scores pin T exactly. Each pass also reloads the
   scores and recomputes their keys, so 4 pivots minimises the operations per entry over the whole search
   (~14 x 15, against ~32 x 9 for plain bisection and ~8 x 39 for 16 pivots; an operation count, not a
   measurement). Any ordered input works: ties, -inf, +inf (NaN is not allowed).
3. Compaction. Every entry with key > T is kept (fewer than ``keep`` of them); of the entries equal to T the
   EARLIEST ``keep - #(key > T)`` are kept, so ties go to the earlier entry, as a stable descending sort would
   order them. One in-order pass over tiles writes the kept keys, values, scores and positions at their output
   row = (kept entries before this tile: a running offset) + (exclusive ``tl.cumsum`` of the kept flags in the
   tile); the running count of equal entries decides which ties are still needed. The output is therefore in
   sequence order, which the compacted-position mode relies on. Dropped rows of K/V are never read.

Splits. One program per (batch row, KV head) is 8 programs for a Llama-8B layer at batch 1: 8 of 132 SMs for
~140 MB of K/V traffic. So the copy of each row can be split into ``num_splits`` contiguous segments, one program
each (grid [B·H, splits]). Every program of a row redoes steps 1-2 (the row's scores are 68 KB, L2 resident) and
counts the kept entries before its segment in one more pass, which gives its starting output row;
``num_splits=1`` is the plain one-program-per-row kernel. The default aims at one program per SM.

Fused scoring (optional). The retaining head is fc2(act(fc1(cat(q, k, v)))): fc1 and its activation stay one
cuBLAS GEMM plus an elementwise op in the attention's forward, and their output ``new_hidden`` [B, q, F] (the
step's q new tokens, the LAST q entries of each row) comes here with ``head_weight`` [H, F] (fc2.weight) and
``head_bias`` [H] (fc2.bias, or None). ``scores`` then holds only the N - q older entries' scores. The last stage
is fused: in a prologue every program computes its row's new scores s[b, h, t] = dot(new_hidden[b, t, :],
head_weight[h, :]) + head_bias[h], accumulated in fp32 (optionally rounded to ``score_dtype``, the dtype the torch
fc2 would output, so both paths rank the same values), +inf for the first ``new_local`` new entries (the local
tokens the cache protects), into a [B, H, q] fp32 scratch; a ``tl.debug_barrier`` makes the program's own stores
visible to its later loads (the split programs of one row write identical values, so the duplicate writes are
benign). Selection and compaction then read scores from the old buffer below index N - q and from the scratch
above it, and the compacted scores include the new entries' computed ones. So fc2 + bias + the local override +
the selection + the compaction are one launch; the fc2 GEMV, the score concatenation and the +inf fill (three
launches and an [B, H, N] copy per layer) are gone. Each program recomputes its row's q x F dot products (about
q·F multiply-adds, reading ``new_hidden`` from L2), the price of not needing a second launch.

Measured on the H100 (docs/results.md, ``scripts/bench_kernel_locret_evict.py --fused-scoring``, Llama-8B shape,
one layer): fused 0.394 ms vs 0.307 ms for fc2 on cuBLAS + this kernel unfused (0.586 ms for the torch path), and
the in-kernel fp32 sums differ from cuBLAS's in the last bit, which can move an entry that sits exactly at the
threshold. So the Locret cache uses cuBLAS fc2 + the unfused kernel; the fused form stays available here.

Inference only (no autograd). Self-contained on purpose (imports only torch, and triton when present): the Locret
export copies this file next to ``cache_llama_locret.py`` so ``trust_remote_code`` loading needs no swiftkv_train.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton is optional: without it (or without CUDA) everything falls back to the torch reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001 - a broken triton install must not break model loading
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "kernel_available",
    "locret_evict",
    "locret_evict_reference",
    "kept_indices_reference",
    "new_scores_reference",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NUM_PIVOTS = 4  # pivots per bisection pass: the interval shrinks 5x per pass (fewest compares per entry overall)
_SCORE_BLOCK = 1024  # scores per tile in the threshold and counting passes
_MIN_SEGMENT = 1024  # fewest entries per program when splitting a row (each program re-reads the row's scores)
_NUM_WARPS = 8
_SCORE_Q_BLOCK = 32  # new tokens per tile in the fused-scoring prologue
_SCORE_F_BLOCK = 128  # hidden features per tile in the fused-scoring prologue
_ROUND_CODES = {None: 0, torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # fused scores rounded to


def _passes_to_exhaust(pivots: int) -> int:
    """Bisection passes that shrink the whole int32 range to one value (width -> width // (pivots + 1))."""
    width, passes = 2**32 - 1, 0
    while width:
        width, passes = width // (pivots + 1), passes + 1
    return passes


_SEARCH_PASSES = _passes_to_exhaust(_NUM_PIVOTS)  # 14 for 4 pivots


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_available(x: torch.Tensor) -> bool:
    """True when the Triton path can run on ``x`` (CUDA tensor, or CPU under ``TRITON_INTERPRET=1``)."""
    if not HAS_TRITON or x.dtype not in _SUPPORTED_DTYPES:
        return False
    return x.is_cuda or (_interpreting() and x.device.type == "cpu")


# ----------------------------------------------------------------------------------------------------------------
# Input checks and the torch reference.
# ----------------------------------------------------------------------------------------------------------------


def _check(keys, values, scores, positions, keep, protect_newest, new_hidden=None, head_weight=None,
           head_bias=None, new_local=0, score_dtype=None) -> int:
    """Validate shapes and arguments; return N (entries per row). With ``new_hidden``, ``scores`` covers only the
    N - q older entries."""
    if keys.dim() != 4 or values.shape != keys.shape:
        raise ValueError(f"keys and values must both be [B, H, N, D], got {tuple(keys.shape)}, {tuple(values.shape)}")
    rows = tuple(keys.shape[:3])
    n = rows[2]
    score_rows = rows
    if new_hidden is not None:
        batch, heads = rows[:2]
        if head_weight is None:
            raise ValueError("fused scoring needs head_weight (fc2.weight, [H, F]) with new_hidden")
        if new_hidden.dim() != 3 or new_hidden.shape[0] != batch or new_hidden.shape[1] > n:
            raise ValueError(f"new_hidden must be [B, q, F] with B = {batch} and q <= N = {n}, got "
                             f"{tuple(new_hidden.shape)}")
        features = new_hidden.shape[2]
        if tuple(head_weight.shape) != (heads, features):
            raise ValueError(f"head_weight must be [H, F] = {(heads, features)}, got {tuple(head_weight.shape)}")
        if head_bias is not None and tuple(head_bias.shape) != (heads,):
            raise ValueError(f"head_bias must be [H] = {(heads,)}, got {tuple(head_bias.shape)}")
        if not (new_hidden.is_floating_point() and head_weight.is_floating_point()):
            raise ValueError("new_hidden and head_weight must be floating point")
        if new_local < 0:
            raise ValueError(f"new_local={new_local} must be >= 0")
        if score_dtype not in _ROUND_CODES:
            raise ValueError(f"score_dtype must be None, float32, float16 or bfloat16, got {score_dtype}")
        fused = [new_hidden, head_weight] + ([] if head_bias is None else [head_bias])
        if len({t.device for t in fused} | {keys.device}) != 1:
            raise ValueError("new_hidden, head_weight and head_bias must be on the keys' device")
        score_rows = (batch, heads, n - new_hidden.shape[1])
    elif head_weight is not None or head_bias is not None:
        raise ValueError("head_weight / head_bias are only used with new_hidden")
    if tuple(scores.shape) != score_rows or tuple(positions.shape) != rows:
        raise ValueError(
            f"scores and positions must be [B, H, N] = {rows} (scores [B, H, N - q] = {score_rows} with new_hidden),"
            f" got {tuple(scores.shape)}, {tuple(positions.shape)}"
        )
    if not scores.is_floating_point() or positions.is_floating_point() or positions.is_complex():
        raise ValueError(f"scores must be floating point and positions integer, got {scores.dtype}, {positions.dtype}")
    if len({t.device for t in (keys, values, scores, positions)}) != 1:
        raise ValueError("keys, values, scores and positions must be on one device")
    if not 0 <= keep <= n:
        raise ValueError(f"keep={keep} is out of range: it must be between 0 and the number of entries {n}")
    if protect_newest < 0:
        raise ValueError(f"protect_newest={protect_newest} must be >= 0")
    return n


def new_scores_reference(new_hidden, head_weight, head_bias=None, new_local: int = 0, score_dtype=None):
    """Fused scoring in torch: [B, H, q] fp32 scores of the new entries, dot(new_hidden[b, t], head_weight[h]) +
    head_bias[h] in fp32 (rounded to ``score_dtype`` when given), +inf for the first ``new_local`` entries."""
    bias = None if head_bias is None else head_bias.float()
    scores = torch.nn.functional.linear(new_hidden.float(), head_weight.float(), bias)
    if score_dtype is not None and score_dtype != torch.float32:
        scores = scores.to(score_dtype).float()
    scores = scores.transpose(1, 2).contiguous()
    if new_local > 0:
        scores[..., :new_local] = float("inf")
    return scores


def kept_indices_reference(scores: torch.Tensor, keep: int, protect_newest: int = 0) -> torch.Tensor:
    """Indices [B, H, keep] (int64, ascending) of the entries eviction keeps.

    The ``keep`` largest scores, the newest ``protect_newest`` entries counting as +inf; among equal scores the
    earlier entry wins (stable descending sort). -0.0 ranks equal to +0.0.
    """
    n = scores.shape[-1]
    ranking = scores.float()
    # fold -0.0 onto +0.0 (a radix sort would otherwise order them); also makes `ranking` a copy we may edit
    ranking = torch.where(ranking == 0, torch.zeros_like(ranking), ranking)
    protect = min(protect_newest, n)
    if protect > 0:
        ranking[..., n - protect :] = float("inf")
    order = torch.sort(ranking, dim=-1, descending=True, stable=True).indices
    return order[..., :keep].sort(dim=-1).values  # sequence order, which compacted positions rely on


def locret_evict_reference(keys, values, scores, positions, keep: int, protect_newest: int = 0, *, new_hidden=None,
                           head_weight=None, head_bias=None, new_local: int = 0, score_dtype=None):
    """Torch version of `locret_evict`: (keys, values, scores fp32, positions int32), each [B, H, keep, ...]."""
    _check(keys, values, scores, positions, keep, protect_newest, new_hidden, head_weight, head_bias, new_local,
           score_dtype)
    if new_hidden is not None:
        new = new_scores_reference(new_hidden, head_weight, head_bias, new_local, score_dtype)
        scores = torch.cat([scores.float(), new], dim=-1)
    index = kept_indices_reference(scores, keep, protect_newest)
    index_kv = index.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
    return (
        keys.gather(2, index_kv),
        values.gather(2, index_kv),
        scores.float().gather(2, index),
        positions.to(torch.int32).gather(2, index),
    )


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel.
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _ranking_keys(s, idx, protect_from):
        """int32 keys ordered as the fp32 scores ``s``; entries at index >= protect_from rank as +inf."""
        s = tl.where(s == 0.0, 0.0, s)  # -0.0 == +0.0 for a float comparison: give them one key
        bits = s.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative: flip the magnitude so larger |s| ranks lower
        return tl.where(idx >= protect_from, 0x7F800000, key)  # 0x7F800000: the key of +inf

    @triton.jit
    def _load_scores(s_row, s_sn, new_row, n_old, idx, mask, FUSED: tl.constexpr):
        """fp32 scores of entries ``idx``: the stored buffer below n_old, the fused prologue's scratch above."""
        if FUSED:
            is_new = mask & (idx >= n_old)
            s = tl.load(s_row + idx.to(tl.int64) * s_sn, mask=mask & (idx < n_old), other=0.0)
            s_new = tl.load(new_row + (idx - n_old), mask=is_new, other=0.0)
            s = tl.where(is_new, s_new, s)
        else:
            s = tl.load(s_row + idx.to(tl.int64) * s_sn, mask=mask, other=0.0)
        return s

    @triton.jit
    def _score_new_entries(x_row, x_sq, x_sf, w_row, w_sf, bias_ptr, h, new_row, Q, F, new_local,
                           HAS_BIAS: tl.constexpr, SCORE_ROUND: tl.constexpr, BLOCK_Q: tl.constexpr,
                           BLOCK_F: tl.constexpr):
        """new_row[t] = dot(x[t, :], w) + bias[h] in fp32 (rounded as SCORE_ROUND says), +inf for t < new_local."""
        if HAS_BIAS:
            bias = tl.load(bias_ptr + h).to(tl.float32)
        else:
            bias = 0.0
        for q0 in range(0, Q, BLOCK_Q):
            t = q0 + tl.arange(0, BLOCK_Q)
            t_mask = t < Q
            acc = tl.zeros([BLOCK_Q, BLOCK_F], dtype=tl.float32)
            for f0 in range(0, F, BLOCK_F):
                f = f0 + tl.arange(0, BLOCK_F)
                f_mask = f < F
                w = tl.load(w_row + f.to(tl.int64) * w_sf, mask=f_mask, other=0.0).to(tl.float32)
                x = tl.load(x_row + t.to(tl.int64)[:, None] * x_sq + f.to(tl.int64)[None, :] * x_sf,
                            mask=t_mask[:, None] & f_mask[None, :], other=0.0).to(tl.float32)
                acc += x * w[None, :]
            s = tl.sum(acc, axis=1) + bias
            if SCORE_ROUND == 1:
                s = s.to(tl.float16).to(tl.float32)
            elif SCORE_ROUND == 2:  # to bf16, round to nearest even, in integer ops: the triton interpreter's
                # fp32 -> bf16 cast truncates, so spell out the rounding the GPU (and torch) does
                bits = s.to(tl.int32, bitcast=True)
                bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
                s = bits.to(tl.float32, bitcast=True)
            s = tl.where(t < new_local, float("inf"), s)
            tl.store(new_row + t, s, mask=t_mask)

    @triton.jit
    def _kth_largest_key(s_row, s_sn, new_row, n_old, N, keep, protect_from, BLOCK_S: tl.constexpr,
                         NUM_PIVOTS: tl.constexpr, SEARCH_PASSES: tl.constexpr, FUSED: tl.constexpr):
        """T = max{t : #(key >= t) >= keep}, by a (NUM_PIVOTS + 1)-way bisection of the int32 range."""
        # Invariant: #(key >= lo) >= keep and T <= hi. int64 so that interval widths cannot overflow.
        lo = tl.full([], -2147483648, tl.int64)
        hi = tl.full([], 2147483647, tl.int64)
        rank = tl.arange(0, NUM_PIVOTS).to(tl.int64) + 1
        for _ in range(SEARCH_PASSES):
            step = (hi - lo) // (NUM_PIVOTS + 1) + 1
            pivots = lo + rank * step
            valid = pivots <= hi
            pivots32 = tl.where(valid, pivots, hi).to(tl.int32)
            # per-lane counts, reduced once per pass: a block-wide reduction per tile would dominate the pass
            hits = tl.zeros([BLOCK_S, NUM_PIVOTS], dtype=tl.int32)
            for start in range(0, N, BLOCK_S):
                idx = start + tl.arange(0, BLOCK_S)
                mask = idx < N
                s = _load_scores(s_row, s_sn, new_row, n_old, idx, mask, FUSED)
                key = tl.where(mask, _ranking_keys(s, idx, protect_from), -2147483648)  # padding: below all pivots
                hits += (key[:, None] >= pivots32[None, :]).to(tl.int32)
            counts = tl.sum(hits, axis=0)
            # counts fall as the pivots rise: the pivots that still reach `keep` are a prefix of length `passed`
            passed = tl.sum(((counts >= keep) & valid).to(tl.int64), axis=0)
            hi = tl.minimum(hi, lo + (passed + 1) * step - 1)  # the next pivot failed (or lies beyond hi)
            lo = lo + passed * step
        return lo.to(tl.int32)

    @triton.jit
    def _count_before(s_row, s_sn, new_row, n_old, N, protect_from, threshold, seg_start, BLOCK_S: tl.constexpr,
                      FUSED: tl.constexpr):
        """(#key > T in the row, #key > T before seg_start, #key == T before seg_start)."""
        above = tl.zeros([BLOCK_S], dtype=tl.int32)
        above_before = tl.zeros([BLOCK_S], dtype=tl.int32)
        equal_before = tl.zeros([BLOCK_S], dtype=tl.int32)
        for start in range(0, N, BLOCK_S):
            idx = start + tl.arange(0, BLOCK_S)
            mask = idx < N
            s = _load_scores(s_row, s_sn, new_row, n_old, idx, mask, FUSED)
            key = _ranking_keys(s, idx, protect_from)
            gt = (key > threshold) & mask
            before = idx < seg_start
            above += gt.to(tl.int32)
            above_before += (gt & before).to(tl.int32)
            equal_before += ((key == threshold) & mask & before).to(tl.int32)
        return tl.sum(above, axis=0), tl.sum(above_before, axis=0), tl.sum(equal_before, axis=0)

    @triton.jit
    def _locret_evict_kernel(
        k_ptr, v_ptr, s_ptr, p_ptr,  # inputs: [B, H, N, D] x2, [B, H, N_old] fp32 scores, [B, H, N] int32 positions
        ko_ptr, vo_ptr, so_ptr, po_ptr,  # outputs, contiguous: [B, H, keep, D] x2, [B, H, keep] x2
        x_ptr, w_ptr, bias_ptr, new_ptr,  # fused scoring: hidden [B, Q, F], fc2 weight [H, F], bias [H], scratch
        H, N, keep, protect_from, seg_len,
        Q, F, new_local,  # fused scoring: new entries (the last Q of the row), features, locally protected ones
        k_sb, k_sh, k_sn, k_sd,
        v_sb, v_sh, v_sn, v_sd,
        s_sb, s_sh, s_sn,
        p_sb, p_sh, p_sn,
        x_sb, x_sq, x_sf,
        w_sh, w_sf,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,  # next power of two >= D
        BLOCK_N: tl.constexpr,  # entries per copy tile
        BLOCK_S: tl.constexpr,  # scores per tile in the selection passes
        NUM_PIVOTS: tl.constexpr,
        SEARCH_PASSES: tl.constexpr,
        FUSED: tl.constexpr = False,  # score the last Q entries here (x_ptr .. new_ptr, Q, F, new_local used)
        HAS_BIAS: tl.constexpr = False,
        SCORE_ROUND: tl.constexpr = 0,  # fused scores rounded to: 0 fp32 (none), 1 fp16, 2 bf16
        BLOCK_Q: tl.constexpr = 32,
        BLOCK_F: tl.constexpr = 128,
    ):
        """Program (b*H + h, segment): select the row's kept entries, copy those of its segment in order."""
        row = tl.program_id(0).to(tl.int64)
        seg_start = tl.program_id(1) * seg_len
        b, h = row // H, row % H
        s_row = s_ptr + b * s_sb + h * s_sh
        new_row = new_ptr + row * Q  # scratch [B, H, Q], contiguous (unused unless FUSED)
        if FUSED:
            n_old = N - Q
            # every program of the row writes the same values: duplicate writes from its split siblings are benign
            _score_new_entries(x_ptr + b * x_sb, x_sq, x_sf, w_ptr + h * w_sh, w_sf, bias_ptr, h, new_row, Q, F,
                               new_local, HAS_BIAS, SCORE_ROUND, BLOCK_Q, BLOCK_F)
            tl.debug_barrier()  # the program's own stores above are visible to its loads below
        else:
            n_old = N

        threshold = _kth_largest_key(s_row, s_sn, new_row, n_old, N, keep, protect_from, BLOCK_S, NUM_PIVOTS,
                                     SEARCH_PASSES, FUSED)
        above, above_before, equal_before = _count_before(s_row, s_sn, new_row, n_old, N, protect_from, threshold,
                                                          seg_start, BLOCK_S, FUSED)
        equal_needed = keep - above  # >= 1 by the choice of the threshold
        out_row = above_before + tl.minimum(equal_before, equal_needed)  # kept entries before this segment
        equal_seen = equal_before

        k_row = k_ptr + b * k_sb + h * k_sh
        v_row = v_ptr + b * v_sb + h * v_sh
        p_row = p_ptr + b * p_sb + h * p_sh
        out_base = row * keep  # first output entry of this (b, h)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < D
        seg_end = tl.minimum(seg_start + seg_len, N)
        for start in range(seg_start, seg_end, BLOCK_N):
            idx = start + tl.arange(0, BLOCK_N)
            mask = idx < seg_end
            idx64 = idx.to(tl.int64)
            s = _load_scores(s_row, s_sn, new_row, n_old, idx, mask, FUSED)
            key = _ranking_keys(s, idx, protect_from)
            equal = ((key == threshold) & mask).to(tl.int32)
            equal_rank = equal_seen + tl.cumsum(equal, axis=0) - equal  # earlier equal entries in the row
            kept = ((key > threshold) & mask) | ((equal != 0) & (equal_rank < equal_needed))
            kept_i = kept.to(tl.int32)
            dst = out_base + (out_row + tl.cumsum(kept_i, axis=0) - kept_i).to(tl.int64)

            tl.store(so_ptr + dst, s, mask=kept)
            tl.store(po_ptr + dst, tl.load(p_row + idx64 * p_sn, mask=kept, other=0), mask=kept)
            kv_mask = kept[:, None] & d_mask[None, :]
            dst_kv = dst[:, None] * D + d[None, :]
            k_tile = tl.load(k_row + idx64[:, None] * k_sn + d[None, :] * k_sd, mask=kv_mask)
            tl.store(ko_ptr + dst_kv, k_tile, mask=kv_mask)
            v_tile = tl.load(v_row + idx64[:, None] * v_sn + d[None, :] * v_sd, mask=kv_mask)
            tl.store(vo_ptr + dst_kv, v_tile, mask=kv_mask)

            out_row += tl.sum(kept_i, axis=0)
            equal_seen += tl.sum(equal, axis=0)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _auto_splits(keys: torch.Tensor, rows: int, n: int) -> int:
    """Segments per row: about one program per SM in all (each program pays the row's whole selection, so more
    programs cost more compute), each at least _MIN_SEGMENT entries long."""
    if not keys.is_cuda:
        return 1
    wanted = triton.cdiv(_sm_count(keys.device.index), max(rows, 1))
    return max(1, min(wanted, n // _MIN_SEGMENT))


def _copy_tile_rows(block_d: int, element_size: int) -> int:
    """Entries per copy step: ~32 KiB of K (and of V) per tile. The copy loop is latency bound, so each step moves
    as much as the registers allow (bf16 D=128: 128 rows, ~110 registers per thread at 8 warps, no spills)."""
    return max(16, min(128, 32768 // (block_d * element_size)))


def _output_specs(keys, values, keep):
    """(shape, dtype) of the four outputs: keys, values, scores, positions."""
    b, h, _, d = keys.shape
    return (((b, h, keep, d), keys.dtype), ((b, h, keep, d), values.dtype), ((b, h, keep), torch.float32),
            ((b, h, keep), torch.int32))


def _empty_outputs(keys, values, keep):
    return tuple(torch.empty(shape, dtype=dtype, device=keys.device) for shape, dtype in
                 _output_specs(keys, values, keep))


def _check_out(out, keys, values, keep):
    for given, (shape, dtype) in zip(out, _output_specs(keys, values, keep), strict=True):
        if (tuple(given.shape) != shape or given.dtype != dtype or not given.is_contiguous()
                or given.device != keys.device):
            raise ValueError(f"out buffers must be contiguous {dtype} tensors of shape {shape} on {keys.device}")


def _evict_triton(keys, values, scores, positions, keep, protect_newest, num_splits, out=None, new_hidden=None,
                  head_weight=None, head_bias=None, new_local=0, score_dtype=None):
    b, h, n, d = keys.shape
    out_k, out_v, out_s, out_p = out if out is not None else _empty_outputs(keys, values, keep)
    if keep == 0 or b * h == 0:
        return out_k, out_v, out_s, out_p
    scores = scores.float()  # no copy when already fp32; views keep their strides
    positions = positions.to(torch.int32)
    if scores.numel() == 0:  # no stored entries (fused: every entry is new): any valid pointer and strides
        scores = scores.new_empty((b, h, 1))

    fused = new_hidden is not None
    if fused:
        q, features = new_hidden.shape[1], new_hidden.shape[2]
        scratch = torch.empty((b, h, q), dtype=torch.float32, device=keys.device)
        bias = head_bias if head_bias is not None else head_weight  # a dummy pointer when there is no bias
        fused_args = (new_hidden, head_weight, bias, scratch)
        fused_sizes = (q, features, min(new_local, q))
        fused_strides = (*new_hidden.stride(), *head_weight.stride())
        fused_meta = dict(FUSED=True, HAS_BIAS=head_bias is not None, SCORE_ROUND=_ROUND_CODES[score_dtype],
                          BLOCK_Q=min(_SCORE_Q_BLOCK, triton.next_power_of_2(max(q, 1))),
                          BLOCK_F=min(_SCORE_F_BLOCK, triton.next_power_of_2(max(features, 1))))
    else:  # the fused-scoring arguments are unused: any tensor serves as a pointer
        fused_args = (scores, scores, scores, scores)
        fused_sizes = (0, 0, 0)
        fused_strides = (0, 0, 0, 0, 0)
        fused_meta = {}

    block_d = triton.next_power_of_2(d)
    block_n = _copy_tile_rows(block_d, max(keys.element_size(), values.element_size()))
    splits = num_splits or _auto_splits(keys, b * h, n)
    seg_len = triton.cdiv(triton.cdiv(n, max(1, splits)), block_n) * block_n  # whole tiles per segment
    grid = (b * h, triton.cdiv(n, seg_len))
    _locret_evict_kernel[grid](
        keys, values, scores, positions, out_k, out_v, out_s, out_p, *fused_args,
        h, n, keep, n - min(protect_newest, n), seg_len, *fused_sizes,
        *keys.stride(), *values.stride(), *scores.stride(), *positions.stride(), *fused_strides,
        D=d, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_S=_SCORE_BLOCK, NUM_PIVOTS=_NUM_PIVOTS,
        SEARCH_PASSES=_SEARCH_PASSES, num_warps=_NUM_WARPS, **fused_meta,
    )
    return out_k, out_v, out_s, out_p


def locret_evict(keys, values, scores, positions, keep: int, protect_newest: int = 0, *, new_hidden=None,
                 head_weight=None, head_bias=None, new_local: int = 0, score_dtype=None, num_splits=None, out=None):
    """Keep the ``keep`` highest-scoring entries of every (batch row, KV head), in sequence order.

    Args:
        keys, values: [B, H, N, D] (each its own dtype; any strides).
        scores: [B, H, N] retaining scores (floating point, no NaN; +-inf allowed); ranked as fp32. With
            ``new_hidden``: [B, H, N - q], the scores of the older entries only.
        positions: [B, H, N] integer token indices, carried along.
        keep: entries to keep, 0 <= keep <= N.
        protect_newest: the newest entries rank as +inf for this selection only (their scores are unchanged).
        new_hidden: optional fused scoring: [B, q, F] act(fc1(qkv)) of the step's q new tokens, which are the LAST
            q entries of every row; their scores are dot(new_hidden[b, t], head_weight[h]) + head_bias[h],
            accumulated in fp32 (see the module docstring).
        head_weight, head_bias: [H, F] and [H] (or None): the retaining head's fc2.
        new_local: the first ``new_local`` new entries score +inf (stored so, as the cache does for local tokens).
        score_dtype: None (fp32) or float16 / bfloat16: round the computed scores to it (then back to fp32), as
            the torch fc2 in that dtype would produce them.
        num_splits: Triton path only: segments (programs) per row; None picks enough to fill the GPU.
        out: Triton path only: optional contiguous output buffers (keys, values, scores, positions) shaped and
            typed as the result, to write into (the reference ignores it).

    Returns fresh contiguous (keys [B, H, keep, D], values [B, H, keep, D], scores fp32 [B, H, keep], positions
    int32 [B, H, keep]); the kept new entries' scores are the computed ones. Ties go to the earlier entry. The
    Triton kernel runs where `kernel_available` (CUDA, or the CPU interpreter), `locret_evict_reference`
    otherwise; both select the same entries (fused: given the same computed scores; fp32 sums in another order
    can differ in the last bit). No autograd.
    """
    fused = dict(new_hidden=new_hidden, head_weight=head_weight, head_bias=head_bias, new_local=new_local,
                 score_dtype=score_dtype)
    _check(keys, values, scores, positions, keep, protect_newest, **fused)
    runnable = kernel_available(keys) and kernel_available(values)
    if new_hidden is not None:
        runnable = runnable and kernel_available(new_hidden) and kernel_available(head_weight) and (
            head_bias is None or kernel_available(head_bias))
    if runnable:
        if out is not None:
            _check_out(out, keys, values, keep)
        with torch.no_grad():
            return _evict_triton(keys, values, scores, positions, keep, protect_newest, num_splits, out, **fused)
    return locret_evict_reference(keys, values, scores, positions, keep, protect_newest, **fused)
