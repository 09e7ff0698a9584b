"""Top-k token ids of each row of logits, as TIR kernels that read the vocabulary once.

A full sort is far too slow (numpy's stable argsort: 2.8 ms per 32000-wide row). In TVM 0.27
relax.op.topk has no legalization, and topi.topk on CPU is an extern call to the runtime's C++
heap (tvm.contrib.sort.topk): one thread, 30 us per 32000-wide row at batch 1 and 118 us at
batch 4, where these kernels take 10 and 33 us on a 2-core x86 VM, and run on GPUs as well.

Each row is cut into `chunks` slices. One task per (row, slice) scans its slice once, keeping the
best k (value, id) pairs in a small sorted buffer; a second kernel merges the chunks * k
survivors of each row into the final k ids.

Order: larger value first; between equal values the lower token id first, which is what numpy's
stable argsort of -logits gives (tree.generate_candidates). -inf competes like any other value
(a lower id wins among equal -inf); NaN never enters the buffer. A row with fewer than k
non-NaN values reports id 2**31 - 1 for the missing ranks.

Most elements lose to the buffer's last entry, so the CPU scan first takes the maximum of a group
of GROUP elements (unrolled, no branches) and only looks at single elements when that maximum
could enter. An insertion rewrites the k entries without branches: entry p becomes entry p - 1,
the new pair or itself, depending on two comparisons.
"""

from __future__ import annotations

import dataclasses

from tvm.script import tirx as T

# Elements whose maximum is compared with the buffer's last entry before any single one is.
GROUP = 16
# CPU: a slice of about this many elements per task, so that batch-1 rows use several cores
# (4 slices at 32000, 16 at 128256). One thread scans 32000 logits in about 13 us.
CPU_SLICE = 8192
# GPU: one thread per slice, slices interleaved so that neighbouring threads read neighbouring ids.
GPU_CHUNKS = 256
# Largest k: the buffer is unrolled into registers and every insertion touches all k entries.
MAX_TOPK = 64
# Id reported for ranks a row could not fill (only when it holds NaN).
MISSING_ID = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class TopkLayout:
    """How a row of `vocab` logits is split among tasks."""

    vocab: int
    # slices per row, each scanned by one task, then merged
    chunks: int
    # True: slice c holds ids c, c + chunks, c + 2 * chunks, ... (coalesced GPU reads);
    # False: a contiguous run of `span` ids
    interleaved: bool
    # bind GPU threads (blockIdx.x = row, threadIdx.x = slice) instead of a CPU parallel loop
    gpu: bool

    @property
    def span(self) -> int:
        """Ids per slice (the last contiguous slice may hold fewer)."""
        per_chunk = -(-self.vocab // self.chunks)
        if self.interleaved:
            return per_chunk
        return -(-per_chunk // GROUP) * GROUP

    @classmethod
    def for_target(cls, vocab: int, gpu: bool) -> "TopkLayout":
        if gpu:
            return cls(vocab=vocab, chunks=GPU_CHUNKS, interleaved=True, gpu=True)
        return cls(vocab=vocab, chunks=-(-vocab // CPU_SLICE), interleaved=False, gpu=False)


def _scratch_scope(layout: TopkLayout) -> str:
    """Storage scope of the small per-task buffers: registers on a GPU ("local"); on a CPU the
    default scope, which TVM 0.27 allocates on the stack (LLVM then keeps the buffer in
    registers), where "local" means a heap workspace allocation per task (see avx512_gemv)."""
    return "local" if layout.gpu else "global"


def chunk_kernel(layout: TopkLayout, k: int):
    """PrimFunc (logits [rows, vocab] float32) -> (values, ids [rows, chunks, k]): each slice's best k."""
    vocab, chunks, span = layout.vocab, layout.chunks, layout.span
    interleaved, gpu = layout.interleaved, layout.gpu
    groups = -(-span // GROUP)
    scratch = _scratch_scope(layout)
    neg_inf = T.float32(float("-inf"))
    missing = T.int32(MISSING_ID)
    insert = _insert_macro(k)

    def token(c, e):
        """Id of element e of slice c."""
        return e * chunks + c if interleaved else c * span + e

    @T.macro
    def offer(bv, bi, x_at_j, j):
        v: T.let[T.float32] = x_at_j
        # enters when better than the last entry: larger, or equal with a lower id
        if v > bv[k - 1] or (v == bv[k - 1] and j < bi[k - 1]):
            insert(bv, bi, v, j)

    @T.macro
    def scan(x, vals, ids, row, c):
        with T.sblock("slice"):
            T.reads(x[row, 0:vocab])
            T.writes(vals[row, c, 0:k], ids[row, c, 0:k])
            bv = T.sblock_alloc_buffer((k,), "float32", scope=scratch)
            bi = T.sblock_alloc_buffer((k,), "int32", scope=scratch)
            best = T.sblock_alloc_buffer((1,), "float32", scope=scratch)
            for s in T.unroll(k):
                bv[s] = neg_inf
                bi[s] = missing
            if interleaved:
                for e in range(span):
                    j: T.let[T.int32] = T.Cast("int32", token(c, e))
                    if j < vocab:
                        offer(bv, bi, x[row, j], j)
            else:
                for g in range(groups):
                    first: T.let[T.int32] = T.Cast("int32", token(c, g * GROUP))
                    if first + GROUP <= vocab:
                        # the group's maximum, skipping NaN (a comparison with NaN is false)
                        best[0] = neg_inf
                        for e in T.unroll(GROUP):
                            best[0] = T.Select(x[row, first + e] > best[0], x[row, first + e], best[0])
                        if best[0] >= bv[k - 1]:
                            for e in range(GROUP):
                                offer(bv, bi, x[row, first + e], first + e)
                    else:
                        for e in range(GROUP):
                            if first + e < vocab:
                                offer(bv, bi, x[row, first + e], first + e)
            for s in T.unroll(k):
                vals[row, c, s] = bv[s]
                ids[row, c, s] = bi[s]

    @T.prim_func(private=True, s_tir=True)
    def topk_chunks(var_x: T.handle, var_vals: T.handle, var_ids: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        rows = T.int64()
        x = T.match_buffer(var_x, (rows, vocab), "float32")
        vals = T.match_buffer(var_vals, (rows, chunks, k), "float32")
        ids = T.match_buffer(var_ids, (rows, chunks, k), "int32")
        if gpu:  # a Python constant: the parser keeps one branch
            for row in T.thread_binding(rows, thread="blockIdx.x"):
                for c in T.thread_binding(chunks, thread="threadIdx.x"):
                    scan(x, vals, ids, row, c)
        else:
            for task in T.parallel(rows * chunks):
                scan(x, vals, ids, task // chunks, T.Cast("int32", task % chunks))

    return topk_chunks


def merge_kernel(layout: TopkLayout, k: int):
    """PrimFunc (values, ids [rows, chunks, k]) -> ids [rows, k] int32: the best k of each row."""
    chunks, gpu = layout.chunks, layout.gpu
    scratch = _scratch_scope(layout)
    neg_inf = T.float32(float("-inf"))
    missing = T.int32(MISSING_ID)
    insert = _insert_macro(k)

    @T.macro
    def merge(vals, ids, out, row):
        with T.sblock("merge"):
            T.reads(vals[row, 0:chunks, 0:k], ids[row, 0:chunks, 0:k])
            T.writes(out[row, 0:k])
            bv = T.sblock_alloc_buffer((k,), "float32", scope=scratch)
            bi = T.sblock_alloc_buffer((k,), "int32", scope=scratch)
            for s in T.unroll(k):
                bv[s] = neg_inf
                bi[s] = missing
            for c, s in T.grid(chunks, k):
                v: T.let[T.float32] = vals[row, c, s]
                j: T.let[T.int32] = ids[row, c, s]
                if v > bv[k - 1] or (v == bv[k - 1] and j < bi[k - 1]):
                    insert(bv, bi, v, j)
            for s in T.unroll(k):
                out[row, s] = bi[s]

    @T.prim_func(private=True, s_tir=True)
    def topk_merge(var_vals: T.handle, var_ids: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        rows = T.int64()
        vals = T.match_buffer(var_vals, (rows, chunks, k), "float32")
        ids = T.match_buffer(var_ids, (rows, chunks, k), "int32")
        out = T.match_buffer(var_out, (rows, k), "int32")
        if gpu:
            for row in T.thread_binding(rows, thread="blockIdx.x"):
                for _ in T.thread_binding(1, thread="threadIdx.x"):
                    merge(vals, ids, out, row)
        else:
            for row in T.parallel(rows):
                merge(vals, ids, out, row)

    return topk_merge


def _insert_macro(k: int):
    """T.macro insert(bv, bi, v, j): put (v, j), known to beat entry k - 1, in its sorted place.

    `above` (the pair beats entry p - 1) and `here` (it beats entry p) hold for every entry from
    the insertion point down, so entry p becomes entry p - 1 when `above`, the pair when only
    `here`, else stays. Entries are rewritten from the last up, so p - 1 is still the old one.
    """
    @T.macro
    def insert(bv, bi, v, j):
        for t in T.unroll(k - 1):
            p: T.let[T.int32] = k - 1 - t
            here: T.let[T.bool] = v > bv[p] or (v == bv[p] and j < bi[p])
            above: T.let[T.bool] = v > bv[p - 1] or (v == bv[p - 1] and j < bi[p - 1])
            bv[p] = T.Select(above, bv[p - 1], T.Select(here, v, bv[p]))
            bi[p] = T.Select(above, bi[p - 1], T.Select(here, j, bi[p]))
        first: T.let[T.bool] = v > bv[0] or (v == bv[0] and j < bi[0])
        bv[0] = T.Select(first, v, bv[0])
        bi[0] = T.Select(first, j, bi[0])

    return insert
