"""Top-k token ids of rows of logits on a GPU: two kernels that each launch many blocks and
reduce across threads, in topk.py's exact order.

topk.py's kernels suit a CPU: a few tasks per row, each scanning thousands of logits. On a GPU
that leaves most SMs idle, and its merge gives each row to one thread. Here:

  topk_chunks  grid (rows, chunks): a block of `threads` threads takes one slice of a row
               (`span` consecutive ids; thread t reads ids t, t + threads, ...: coalesced).
               Each thread keeps its best k in registers; then k rounds of two cross-thread
               reductions (the best key, then the lowest id holding it) take the block's best
               k in order, the thread that held each one dropping it. Out: [rows, chunks, k].
  topk_merge   grid (rows, groups): the chunks * k candidates of a row are ranked by counting,
               for each candidate, the candidates that beat it (a cross-thread sum). The one of
               rank r < k is the row's r-th id; its block writes it. Ranks are distinct (ties
               broken by candidate position), so each output is written once, by one block.

Order, as topk.py and numpy's stable argsort of -logits: larger value first, then lower id; -inf
competes like any value; NaN never enters; ranks a row cannot fill get MISSING_ID. Values are
compared as int32 keys (the float32 bits made monotone, -0.0 folded into +0.0): EMPTY_KEY, the
smallest int32, marks an empty entry below every value, -inf included, and the reductions are
plain max, min and sum.

Each kernel is written once, as blocks. gpu=True binds its loops to blocks and threads (TVM lowers
the reductions over threadIdx.x to warp shuffles and shared memory); gpu=False leaves the same
blocks in serial loops, so that tests check them on a CPU (tests/test_gpu_topk.py).
"""

from __future__ import annotations

import dataclasses

from tvm import tirx
from tvm.script import tirx as T

from .kernels import SCHEDULE_ATTR
from .topk import MAX_TOPK, MISSING_ID

# Blocks each kernel launches at batch 1, at least: 2 per SM of a 132-SM H100/H200.
MIN_BLOCKS = 264
# Threads of a topk_chunks block: a slice of a 32000-wide row has a few elements per thread.
CHUNK_THREADS = 128
# Threads of a topk_merge block, which share the comparisons of its candidates.
MERGE_THREADS = 64
# Candidates a topk_merge block ranks, at most (one cross-thread sum each).
MAX_GROUP = 16
# The key of an empty entry: below the key of every float32, -inf included.
EMPTY_KEY = -(2**31)


@dataclasses.dataclass(frozen=True)
class GpuTopkLayout:
    """How the kernels split rows of `vocab` logits; sized for `rows_at_batch_1` rows (the rows
    a call has at batch 1) to launch MIN_BLOCKS blocks."""

    vocab: int
    rows_at_batch_1: int
    # slices per row, one topk_chunks block each
    chunks: int
    # candidates per topk_merge block
    group: int

    @property
    def span(self) -> int:
        """Consecutive ids per slice (the last may hold fewer)."""
        return -(-self.vocab // self.chunks)

    @property
    def chunk_threads(self) -> int:
        return min(CHUNK_THREADS, self.span)

    def merge_groups(self, k: int) -> int:
        """topk_merge blocks per row."""
        return -(-self.chunks * k // self.group)

    @classmethod
    def for_rows(cls, vocab: int, rows_at_batch_1: int, k: int) -> "GpuTopkLayout":
        rows = max(1, rows_at_batch_1)
        # enough slices for MIN_BLOCKS blocks, and at least one id per thread of each
        chunks = max(1, min(-(-MIN_BLOCKS // rows), vocab))
        # the largest group (a power of two) that still leaves MIN_BLOCKS merge blocks
        group = MAX_GROUP
        while group > 1 and (group > chunks * k or rows * -(-chunks * k // group) < MIN_BLOCKS):
            group //= 2
        return cls(vocab=vocab, rows_at_batch_1=rows, chunks=chunks, group=group)


def _key(value):
    """An int32 that orders as the float32 `value` does (not NaN); -0.0 has +0.0's key."""
    # (TVM's simplifier drops "+ 0.0", which would fold -0.0 into +0.0, so a select does it)
    bits = T.reinterpret("int32", T.Select(value == T.float32(0.0), T.float32(0.0), value))
    return T.Select(bits < 0, bits ^ T.int32(0x7FFFFFFF), bits)


def _beats(key, id_, other_key, other_id):
    """(key, id_) comes before (other_key, other_id): a larger key, or an equal key and lower id."""
    return tirx.Or(key > other_key, tirx.And(key == other_key, id_ < other_id))


def _insert_macro(k: int):
    """T.macro insert(bk, bi, t, key, j): put (key, j), known to beat entry k - 1 of thread t's
    buffer, in its sorted place (topk._insert_macro's branch-free shift, on row t)."""
    @T.macro
    def insert(bk, bi, t, key, j):
        for s in T.unroll(k - 1):
            p: T.let[T.int32] = k - 1 - s
            here: T.let[T.bool] = _beats(key, j, bk[t, p], bi[t, p])
            above: T.let[T.bool] = _beats(key, j, bk[t, p - 1], bi[t, p - 1])
            bk[t, p] = T.Select(above, bk[t, p - 1], T.Select(here, key, bk[t, p]))
            bi[t, p] = T.Select(above, bi[t, p - 1], T.Select(here, j, bi[t, p]))
        first: T.let[T.bool] = _beats(key, j, bk[t, 0], bi[t, 0])
        bk[t, 0] = T.Select(first, key, bk[t, 0])
        bi[t, 0] = T.Select(first, j, bi[t, 0])

    return insert


def chunk_kernel(layout: GpuTopkLayout, k: int, gpu: bool = True):
    """PrimFunc (logits [rows, vocab] float32) -> (keys, ids [rows, chunks, k] int32): each
    slice's best k, best first; entries a slice cannot fill have EMPTY_KEY and MISSING_ID."""
    if not 1 <= k <= MAX_TOPK:
        raise ValueError(f"k={k} is outside 1..{MAX_TOPK}")
    vocab, chunks, span, threads = layout.vocab, layout.chunks, layout.span, layout.chunk_threads
    per_thread = -(-span // threads)
    # per-thread buffers in registers on a GPU; the CPU twin keeps everything in plain memory
    local = "local" if gpu else "global"
    shared = "shared" if gpu else "global"
    empty = T.int32(EMPTY_KEY)
    missing = T.int32(MISSING_ID)
    insert = _insert_macro(k)
    schedule = f"medusa top-k: {span} ids/block, {k} rounds"

    @T.macro
    def scan(x, bk, bi, rows, row, c, t):
        # thread t's best k of ids c * span + t + m * threads, best first
        with T.sblock("scan"):
            vrow = T.axis.spatial(rows, row)
            vc = T.axis.spatial(chunks, c)
            vt = T.axis.spatial(threads, t)
            T.reads(x[vrow, 0:vocab])
            T.writes(bk[vt, 0:k], bi[vt, 0:k])
            for s in T.unroll(k):
                bk[vt, s] = empty
                bi[vt, s] = missing
            for m in range(per_thread):
                offset: T.let[T.int32] = m * threads + vt
                j: T.let[T.int32] = vc * span + offset
                if offset < span and j < vocab:
                    v: T.let[T.float32] = x[vrow, j]
                    # NaN never enters
                    if not T.isnan(v):
                        key: T.let[T.int32] = _key(v)
                        if _beats(key, j, bk[vt, k - 1], bi[vt, k - 1]):
                            insert(bk, bi, vt, key, j)

    @T.macro
    def round_best(bk, best, t):
        with T.sblock("round_best"):
            vt = T.axis.reduce(threads, t)
            T.reads(bk[vt, 0])
            T.writes(best[0])
            with T.init():
                best[0] = empty
            best[0] = T.max(best[0], bk[vt, 0])

    @T.macro
    def round_winner(bk, bi, best, winner, t):
        # ids are distinct, so exactly one thread's first entry is (best, winner)
        with T.sblock("round_winner"):
            vt = T.axis.reduce(threads, t)
            T.reads(bk[vt, 0], bi[vt, 0], best[0])
            T.writes(winner[0])
            with T.init():
                winner[0] = missing
            winner[0] = T.min(winner[0], T.Select(bk[vt, 0] == best[0], bi[vt, 0], missing))

    @T.macro
    def round_take(bk, bi, best, winner, keys, ids, rows, row, c, s, t):
        # thread 0 writes the round's pick; the thread that held it drops it
        with T.sblock("round_take"):
            vrow = T.axis.spatial(rows, row)
            vc = T.axis.spatial(chunks, c)
            vs = T.axis.spatial(k, s)
            vt = T.axis.spatial(threads, t)
            T.reads(bk[vt, 0:k], bi[vt, 0:k], best[0], winner[0])
            T.writes(bk[vt, 0:k], bi[vt, 0:k], keys[vrow, vc, vs], ids[vrow, vc, vs])
            # shared values are read into registers first: TVM plans its barriers only for
            # shared loads outside conditions
            picked: T.let[T.int32] = winner[0]
            picked_key: T.let[T.int32] = best[0]
            if vt == 0:
                keys[vrow, vc, vs] = picked_key
                ids[vrow, vc, vs] = picked
            if bi[vt, 0] == picked and picked != missing:
                for p in T.unroll(k - 1):
                    bk[vt, p] = bk[vt, p + 1]
                    bi[vt, p] = bi[vt, p + 1]
                bk[vt, k - 1] = empty
                bi[vt, k - 1] = missing

    @T.prim_func(private=True, s_tir=True)
    def topk_chunks(var_x: T.handle, var_keys: T.handle, var_ids: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, SCHEDULE_ATTR: schedule})
        rows = T.int64()
        x = T.match_buffer(var_x, (rows, vocab), "float32")
        keys = T.match_buffer(var_keys, (rows, chunks, k), "int32")
        ids = T.match_buffer(var_ids, (rows, chunks, k), "int32")
        bk = T.sblock_alloc_buffer((threads, k), "int32", scope=local)
        bi = T.sblock_alloc_buffer((threads, k), "int32", scope=local)
        best = T.sblock_alloc_buffer((1,), "int32", scope=shared)
        winner = T.sblock_alloc_buffer((1,), "int32", scope=shared)
        if gpu:  # a Python constant: the parser keeps one branch
            for row in T.thread_binding(rows, thread="blockIdx.y"):
                for c in T.thread_binding(chunks, thread="blockIdx.x"):
                    for t in T.thread_binding(threads, thread="threadIdx.x"):
                        scan(x, bk, bi, rows, row, c, t)
                    for s in range(k):
                        for t in T.thread_binding(threads, thread="threadIdx.x"):
                            round_best(bk, best, t)
                        for t in T.thread_binding(threads, thread="threadIdx.x"):
                            round_winner(bk, bi, best, winner, t)
                        for t in T.thread_binding(threads, thread="threadIdx.x"):
                            round_take(bk, bi, best, winner, keys, ids, rows, row, c, s, t)
        else:
            for row, c in T.grid(rows, chunks):
                for t in range(threads):
                    scan(x, bk, bi, rows, row, c, t)
                for s in range(k):
                    for t in range(threads):
                        round_best(bk, best, t)
                    for t in range(threads):
                        round_winner(bk, bi, best, winner, t)
                    for t in range(threads):
                        round_take(bk, bi, best, winner, keys, ids, rows, row, c, s, t)

    return topk_chunks


def merge_kernel(layout: GpuTopkLayout, k: int, gpu: bool = True):
    """PrimFunc (keys, ids [rows, chunks, k]) -> ids [rows, k] int32: each row's best k."""
    if not 1 <= k <= MAX_TOPK:
        raise ValueError(f"k={k} is outside 1..{MAX_TOPK}")
    chunks, group = layout.chunks, layout.group
    candidates = chunks * k
    groups = layout.merge_groups(k)
    threads = min(MERGE_THREADS, candidates)
    per_thread = -(-candidates // threads)
    shared = "shared" if gpu else "global"
    schedule = f"medusa top-k merge: ranks {group} of {candidates}/block"

    def beaten_by(keys, ids, row, u, q):
        """Candidate u comes before candidate q (both < candidates): by key, id, then position,
        so that even equal empty entries have distinct ranks."""
        ku = keys[row, u // k, u % k]
        kq = keys[row, q // k, q % k]
        iu = ids[row, u // k, u % k]
        iq = ids[row, q // k, q % k]
        return tirx.Or(ku > kq, tirx.And(ku == kq, tirx.Or(iu < iq, tirx.And(iu == iq, u < q))))

    @T.macro
    def count(keys, ids, rank, rows, row, g, q, t, m):
        with T.sblock("count"):
            vrow = T.axis.spatial(rows, row)
            vg = T.axis.spatial(groups, g)
            vq = T.axis.spatial(group, q)
            vt = T.axis.reduce(threads, t)
            vm = T.axis.reduce(per_thread, m)
            T.reads(keys[vrow, 0:chunks, 0:k], ids[vrow, 0:chunks, 0:k])
            T.writes(rank[vq])
            with T.init():
                rank[vq] = 0
            # (no lets here: TVM takes a reduction body to be the update alone)
            rank[vq] = rank[vq] + T.if_then_else(
                vg * group + vq < candidates and vm * threads + vt < candidates,
                T.Cast("int32", beaten_by(keys, ids, vrow, vm * threads + vt, vg * group + vq)), 0)

    @T.macro
    def place(ids, rank, out, rows, row, g, t):
        # thread q places candidate g * group + q if its rank is below k
        with T.sblock("place"):
            vrow = T.axis.spatial(rows, row)
            vg = T.axis.spatial(groups, g)
            vt = T.axis.spatial(threads, t)
            T.reads(ids[vrow, 0:chunks, 0:k], rank[0:group])
            T.writes(out[vrow, 0:k])
            mine: T.let[T.int32] = vg * group + vt
            if vt < group and mine < candidates:
                r: T.let[T.int32] = rank[vt]
                if r < k:
                    out[vrow, r] = ids[vrow, mine // k, mine % k]

    @T.prim_func(private=True, s_tir=True)
    def topk_merge(var_keys: T.handle, var_ids: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, SCHEDULE_ATTR: schedule})
        rows = T.int64()
        keys = T.match_buffer(var_keys, (rows, chunks, k), "int32")
        ids = T.match_buffer(var_ids, (rows, chunks, k), "int32")
        out = T.match_buffer(var_out, (rows, k), "int32")
        rank = T.sblock_alloc_buffer((group,), "int32", scope=shared)
        if gpu:
            for row in T.thread_binding(rows, thread="blockIdx.y"):
                for g in T.thread_binding(groups, thread="blockIdx.x"):
                    for q in range(group):
                        for t in T.thread_binding(threads, thread="threadIdx.x"):
                            for m in range(per_thread):
                                count(keys, ids, rank, rows, row, g, q, t, m)
                    for t in T.thread_binding(threads, thread="threadIdx.x"):
                        place(ids, rank, out, rows, row, g, t)
        else:
            for row, g in T.grid(rows, groups):
                for q, t, m in T.grid(group, threads, per_thread):
                    count(keys, ids, rank, rows, row, g, q, t, m)
                for t in range(threads):
                    place(ids, rank, out, rows, row, g, t)

    return topk_merge
