"""CPU (llvm) schedules for the Medusa heads' GEMV kernels (tools/bench_kernels.py times them).

Every Linear in model.py is one reduction block `C[i, j] = sum_k x[i, k] * w(j, k)` over W in
its stored [out, in] layout, with i the dynamic batch and w(j, k) either a plain weight or a
code unpacked from a uint32 word and scaled, all accumulated in float32. At batch 1 to 8 these
kernels read every weight once and do a few flops per byte, so the goal is to stream W at the
machine's read bandwidth, read it once per call whatever the batch, and keep the unpacking in
registers. The recipe, per GEMV block:

  1. Batch tiles. The dynamic batch is cut into batch // 8 tiles of 8 rows and one tile of
     the batch % 8 rows left. Each tile size (1 to 8) is its own copy of the block with a
     constant row count, so its rows become unrolled register accumulators with no bounds
     checks, and W is read once per tile: once per call up to batch 8.
  2. Lanes over k. k is split into (ko, word, lane): a lane is one code of a uint32 word (8 for
     int4, 10 for int3) or one of 16 plain weights, vectorized. rfactor over (word, lane) gives
     float32 partial sums per lane that live in registers; they are summed once per output.
     Unpacking a word is then a broadcast, a variable shift and a mask, and the scale index
     k // group is one value per word (a broadcast).
  3. Rows. The output rows are the parallel loop, in steps of a few rows (each thread takes
     one contiguous run of them); in a step, ko runs over the whole rows of W and every
     batch row of the tile reads the same unpacked weights. TILE_SHAPE_* sets the step per tile.
  4. Small buffers. The partial sums go through a reindexed buffer indexed by the tile's own
     rows, so that their storage is a constant few hundred bytes per step (stack, registers
     after LLVM), not a batch-sized workspace allocation per output row.
Other blocks of a fused function (bias, SiLU, residual) are elementwise and small; they are
inlined into one block where TVM allows it and that block is parallelized over rows.

The parallel loops run on TVM's thread pool, which starts with half the logical CPUs on x86
(one on a 2-vCPU machine): runtime.configure_cpu_threads sizes it, as the runtime and the
benchmark below do.
"""

from __future__ import annotations

import dataclasses

import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.s_tir import SBlock, SBlockRealize, Schedule, ScheduleError

from ..errors import CompileError
from ..quantization import get_scheme
from ..spec import MedusaConfig
from .model import MedusaModel
from .prim_funcs import rewrite_prim_funcs

# The largest batch tile: it repeats batch // MAX_TILE times, then one tile of the remaining
# batch % MAX_TILE rows runs. Each tile size is its own copy of the kernel.
MAX_TILE = 8
BATCH_TILES = tuple(range(MAX_TILE, 0, -1))
# Vector lanes over k for plain weights: one 512-bit register of float32 accumulators.
PLAIN_LANES = 16


@dataclasses.dataclass(frozen=True)
class TileShape:
    """How one batch tile walks W. Each step multiplies `rows` rows of W by `words` vectors of
    lanes for every batch row of the tile, unrolled: rows * words * tile / passes accumulators."""

    rows: int
    words: int
    # batch rows per pass over a step of rows (1 pass: all of the tile); with 2 passes the
    # second reads the step's weights again from L1/L2 but needs half the accumulators
    passes: int = 1


# Per batch tile, the fastest of a sweep at the vicuna-7b shape against a streaming read of the
# same bytes (Zen 4, 2 cores; differences under ~10% were noise there). Plain weights are
# memory-bound: more rows per step means more streams in flight (batch 1: 8 rows 1.00x the
# read, 2 rows 1.16x); from 2 batch rows on, 4 rows also share each x vector, and at 8 two
# passes of 4 rows (16 accumulators) beat one pass of 32 that spills (1.45x vs 1.9x). Packed
# rows are short (2 KiB for 4096 int4 codes) and unpacking is the bottleneck: one row per step
# keeps a single sequential stream per thread (batch 1: 7.8 ms vs 11.3 ms with 2 rows), and
# from 3 batch rows on 2 rows per step share the x vectors.
TILE_SHAPE_PLAIN = {1: TileShape(8, 1), **{t: TileShape(4, 1) for t in range(2, 8)},
                    8: TileShape(4, 1, passes=2)}
TILE_SHAPE_PACKED = {1: TileShape(1, 4), 2: TileShape(1, 2),
                     **{t: TileShape(2, 1) for t in range(3, 9)}}


@dataclasses.dataclass(frozen=True)
class _Gemv:
    """A reduction block C[i, j] = sum_k ... found at the top of a PrimFunc's root block."""

    position: int  # index of its loop nest among the root block's statements
    block: SBlock
    loops: tuple  # the three For loops (batch, out, k), outermost first
    out_features: int
    in_features: int
    # k-elements unpacked from one storage word (8 for int4), or 0 for plain weights
    codes_per_word: int


# ---------------------------------------------------------------------------------------------
# Finding the GEMV blocks


def root_statements(func: tirx.PrimFunc) -> list:
    body = func.body.block.body
    return list(body.seq) if isinstance(body, tirx.SeqStmt) else [body]


def _loop_nest(stmt, depth: int) -> tuple[list, object]:
    loops = []
    while isinstance(stmt, tirx.For) and len(loops) < depth:
        loops.append(stmt)
        stmt = stmt.body
    return loops, stmt


def _codes_per_word(block: SBlock, k_var) -> int:
    """c where the block reads an integer buffer at [.., k // c] (a packed code), else 0."""
    found: list[int] = []

    def visit(load) -> None:
        if not str(load.source.dtype).startswith(("int", "uint")):
            return
        index = load.indices[-1]
        if (isinstance(index, tirx.FloorDiv) and index.a.same_as(k_var)
                and isinstance(index.b, tirx.IntImm)):
            found.append(int(index.b))

    tvm_ffi.structural_walk(block.body, (tvm.ir.expr.TensorLoad, visit))
    return min(found) if found else 0


def _is_sum_of_products(block: SBlock) -> bool:
    """The block's update is C[...] = C[...] + a * b, as te.sum(x * w) lowers."""
    store = block.body
    if not isinstance(store, tirx.stmt.BufferStore):
        return False
    value = store.value
    return (isinstance(value, tirx.Add) and isinstance(value.a, tvm.ir.expr.TensorLoad)
            and value.a.source.same_as(store.buffer) and isinstance(value.b, tirx.Mul))


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    """Whether any loop of `func` is already parallel, vectorized, unrolled or thread-bound."""
    kinds: list = []
    tvm_ffi.structural_walk(func.body, (tirx.For, lambda loop: kinds.append(loop.kind)))
    return any(kind != tirx.ForKind.SERIAL for kind in kinds)


def _as_gemv(position: int, stmt) -> _Gemv | None:
    loops, inner = _loop_nest(stmt, 3)
    if len(loops) != 3 or not isinstance(inner, SBlockRealize):
        return None
    block = inner.block
    kinds = [iv.iter_type for iv in block.iter_vars]
    if kinds != [tirx.IterVar.DataPar, tirx.IterVar.DataPar, tirx.IterVar.CommReduce]:
        return None
    if block.init is None or len(block.writes) != 1 or len(block.writes[0].region) != 2:
        return None
    if not _is_sum_of_products(block):
        return None
    # each block var bound to its own loop, in order: a plain (batch, out, k) nest
    if not all(value.same_as(loop.loop_var) for value, loop in zip(inner.iter_values, loops)):
        return None
    out_extent, k_extent = loops[1].extent, loops[2].extent
    if not (isinstance(out_extent, tirx.IntImm) and isinstance(k_extent, tirx.IntImm)):
        return None
    return _Gemv(position, block, tuple(loops), int(out_extent), int(k_extent),
                 _codes_per_word(block, block.iter_vars[2].var))


def find_gemvs(func: tirx.PrimFunc) -> list[_Gemv]:
    """The GEMV blocks this module knows how to schedule, in body order; none in a function
    that already has a schedule (parallel, vector or unrolled loops)."""
    if _is_scheduled(func):
        return []
    return [g for g in (_as_gemv(n, s) for n, s in enumerate(root_statements(func))) if g]


# ---------------------------------------------------------------------------------------------
# Batch tiles


def _tile_block(block: SBlock, name: str, tile: int, count, offset) -> SBlock:
    """`block` restricted to batch rows offset + io*tile + ii, with io < count (count None: io = 0).

    Block vars: ([io,] ii, j, k); fresh variables, so several copies can live in one function.
    """
    batch_iv, out_iv, k_iv = block.iter_vars
    dtype = batch_iv.var.ty.dtype
    zero = tirx.const(0, dtype)
    ii = tirx.Var("v_ii", dtype)
    out_var = tirx.Var(out_iv.var.name, out_iv.var.ty.dtype)
    k_var = tirx.Var(k_iv.var.name, k_iv.var.ty.dtype)
    iter_vars = [
        tirx.IterVar(tvm.ir.Range(zero, tirx.const(tile, dtype)), ii, tirx.IterVar.DataPar),
        tirx.IterVar(out_iv.dom, out_var, tirx.IterVar.DataPar),
        tirx.IterVar(k_iv.dom, k_var, tirx.IterVar.CommReduce),
    ]
    row = offset + ii
    if count is not None:
        io = tirx.Var("v_io", dtype)
        iter_vars.insert(0, tirx.IterVar(tvm.ir.Range(zero, count), io, tirx.IterVar.DataPar))
        row = offset + io * tile + ii
    remap = {batch_iv.var: row, out_iv.var: out_var, k_iv.var: k_var}

    def substitute(node):
        return tvm_ffi.structural_map(node, (tvm.ir.expr.Var, lambda v: remap.get(v, v)))

    return SBlock(iter_vars, substitute(block.reads), substitute(block.writes), name,
                  substitute(block.body), substitute(block.init), block.alloc_buffers,
                  block.match_buffers, block.annotations)


def _tile_name(gemv: _Gemv, tile: int) -> str:
    return f"{gemv.block.name_hint}_b{tile}"


def _tile_scope_name(tile_name: str) -> str:
    return f"{tile_name}_tile"


def _batch_tiles(gemv: _Gemv) -> tirx.Stmt:
    """The GEMV's loop nest replaced by one nest per batch tile, each in its own opaque block
    (so each copy is the only writer in its scope, as rfactor requires)."""
    batch = gemv.loops[0].extent
    dtype = batch.ty.dtype
    parts = []
    for tile in BATCH_TILES:
        if tile == MAX_TILE:  # rows [0, MAX_TILE * (batch // MAX_TILE)), a tile at a time
            count, offset, runs = tirx.floordiv(batch, tile), tirx.const(0, dtype), True
        else:  # the remaining rows, when there are exactly `tile` of them
            count, offset = None, tirx.floordiv(batch, MAX_TILE) * MAX_TILE
            runs = tirx.floormod(batch, MAX_TILE) == tile
        block = _tile_block(gemv.block, _tile_name(gemv, tile), tile, count, offset)
        extents = ([count] if count is not None else []) + [
            tirx.const(tile, dtype), gemv.loops[1].extent, gemv.loops[2].extent]
        names = ("io", "ii", "j", "k")[-len(extents):]
        loop_vars = [tirx.Var(name, extent.ty.dtype) for name, extent in zip(names, extents)]
        body = SBlockRealize(loop_vars, True, block)
        for var, extent in reversed(list(zip(loop_vars, extents))):
            body = tirx.For(var, tirx.const(0, extent.ty.dtype), extent, tirx.ForKind.SERIAL, body)
        scope = SBlock([], [], [], _tile_scope_name(block.name_hint), body)
        parts.append(SBlockRealize([], runs, scope))
    return tirx.SeqStmt(parts)


def _with_batch_tiles(func: tirx.PrimFunc, gemvs: list[_Gemv]) -> tirx.PrimFunc:
    statements = root_statements(func)
    for gemv in gemvs:
        statements[gemv.position] = _batch_tiles(gemv)
    root_realize = func.body
    root = root_realize.block
    body = statements[0] if len(statements) == 1 else tirx.SeqStmt(statements)
    new_root = SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, body, root.init,
                      root.alloc_buffers, root.match_buffers, root.annotations)
    return func.with_body(SBlockRealize(root_realize.iter_values, root_realize.predicate, new_root))


# ---------------------------------------------------------------------------------------------
# The schedule


def _lanes(gemv: _Gemv) -> int:
    """Vector lanes over k: one word's codes, or PLAIN_LANES plain weights; 1 if k does not
    split evenly (correct, not vectorized)."""
    if gemv.codes_per_word:
        return gemv.codes_per_word if gemv.in_features % gemv.codes_per_word == 0 else 1
    return next(n for n in (PLAIN_LANES, 8, 4, 2, 1) if gemv.in_features % n == 0)


def _largest_divisor(limit: int, of: int) -> int:
    return next(n for n in range(limit, 0, -1) if of % n == 0)


def _schedule_tile(sch: Schedule, name: str, tile: int, gemv: _Gemv) -> None:
    shape = (TILE_SHAPE_PACKED if gemv.codes_per_word else TILE_SHAPE_PLAIN)[tile]
    lanes = _lanes(gemv)
    words = _largest_divisor(shape.words, gemv.in_features // lanes)
    rows = _largest_divisor(shape.rows, gemv.out_features)

    block = sch.get_sblock(name)
    # partial sums indexed by the block's own vars ([io,] ii, j): a tile-sized buffer
    partial = sch.reindex(block, ("write", 0))
    *_, k = sch.get_loops(block)
    _, k_word, k_lane = sch.split(k, [None, words, lanes])
    lanes_block = sch.rfactor(sch.fuse(k_word, k_lane), factor_axis=-1)
    *_, ii, j, ko, k_inner = sch.get_loops(lanes_block)
    j_outer, j_inner = sch.split(j, [None, rows])
    k_word, k_lane = sch.split(k_inner, [words, lanes])
    passes = _largest_divisor(shape.passes, tile)
    ii_pass, ii = sch.split(ii, [passes, None])
    sch.reorder(j_outer, ii_pass, ko, j_inner, k_word, ii, k_lane)
    sch.parallel(j_outer)
    # the sum over lanes and the copy out run per step of rows, while its partial sums are hot
    sch.reverse_compute_at(block, j_outer)
    sch.reverse_compute_at(partial, j_outer)
    sch.vectorize(k_lane)
    for loop in (k_word, ii, j_inner):
        sch.unroll(loop)
    sch.decompose_reduction(lanes_block, ko)


def _schedule_elementwise(sch: Schedule, tile_scopes: set[str]) -> None:
    """Inline the small elementwise tail of a fused function and parallelize what remains."""
    root = sch.get_sblock("root")

    def tail() -> list:
        return [b for b in sch.get_child_blocks(root) if sch.get(b).name_hint not in tile_scopes]

    for block in tail()[:-1]:
        try:
            sch.compute_inline(block)
        except ScheduleError:
            pass  # leave a block TVM cannot inline where it is
    for block in tail():
        loops = sch.get_loops(block)
        if len(loops) < 2 or not isinstance(sch.get(loops[-1]).extent, tirx.IntImm):
            continue
        try:
            outer, inner = sch.split(loops[-1], [None, PLAIN_LANES])
            sch.reorder(outer, *loops[:-1], inner)
            sch.parallel(outer)
        except ScheduleError:
            continue


def schedule_gemv_func(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """`func` with every GEMV block scheduled as described above, or None if it has none."""
    gemvs = find_gemvs(func)
    if not gemvs:
        return None
    sch = Schedule(_with_batch_tiles(func, gemvs))
    scopes = set()
    for gemv in gemvs:
        for tile in BATCH_TILES:
            _schedule_tile(sch, _tile_name(gemv, tile), tile, gemv)
            scopes.add(_tile_scope_name(_tile_name(gemv, tile)))
    _schedule_elementwise(sch, scopes)
    return sch.mod["main"]


def schedule_cpu_kernels(mod: tvm.IRModule,
                         target: tvm.target.Target | None = None) -> tvm.IRModule:
    """Schedule every GEMV-shaped PrimFunc of `mod` for an llvm target; others are left as
    they are. Call it after LegalizeOps/FuseOps/FuseTIR, where dlight would run on a GPU.
    A target of another kind returns `mod` unchanged."""
    if target is not None and target.kind.name != "llvm":
        return mod
    return rewrite_prim_funcs(mod, schedule_gemv_func)


@tvm.transform.module_pass(opt_level=0, name="medusa.ScheduleCPUKernels")
def schedule_cpu_kernels_pass(mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """schedule_cpu_kernels as a module pass, for the target of the enclosing `with target:`."""
    return schedule_cpu_kernels(mod, tvm.target.Target.current(allow_none=True))


def head_prim_funcs(scheme_name: str, hidden: int,
                    vocab: int) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """The (resblock, vocab projection) PrimFuncs of one head as model.py writes them, after
    legalization and fusion as in `medusa compile`."""
    scheme = get_scheme(scheme_name)
    config = MedusaConfig(medusa_num_heads=1, medusa_num_layers=1, hidden_size=hidden,
                          vocab_size=vocab)
    model = MedusaModel(config, scheme)
    model.to(scheme.model_dtype)
    mod, _ = model.export_tvm(spec=model.get_default_spec())
    mod = tvm.transform.Sequential([
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ])(mod)
    kernels = [f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc) and find_gemvs(f)]
    # the ResBlock's GEMV is fused with its bias/SiLU/residual tail; the projection is alone
    resblock = [f for f in kernels if len(root_statements(f)) > 1]
    projection = [f for f in kernels if len(root_statements(f)) == 1]
    if len(resblock) != 1 or len(projection) != 1:
        raise CompileError(
            f"a {scheme_name} head lowered to {len(resblock)} ResBlock and {len(projection)} "
            "projection GEMV kernels, expected one of each; model.py and cpu_schedule disagree"
        )
    return resblock[0], projection[0]
