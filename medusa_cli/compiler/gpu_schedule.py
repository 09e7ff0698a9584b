"""GPU schedules for the Medusa heads' GEMV kernels, every GPU target and every scheme.

On a GPU build every Linear of model.py is a weight stage W[j, k] (float32: a plain weight
converted, or a code unpacked and scaled, model.centred_code) and a reduction
C[i, j] = sum_k x[i, k] * W[j, k] accumulated in float32, followed in the ResBlock by its bias,
SiLU and residual. At batch 1 to 8 the kernel streams every weight once and does a few flops per
byte: it is bound by memory bandwidth, and on an H100/H200 almost bound by instruction issue too
for 4-bit weights (one FMA per weight and batch row, plus the unpacking). The schedule, per GEMV:

  1. Batch tile. The dynamic batch is padded to a multiple of `tile` = 8 rows (pad_einsum) and
     cut into tiles, one per blockIdx.y. A block computes its rows of W for every
     row of its tile, so W is read once per call up to batch 8. Rows of the tile past the batch
     are skipped (a uniform branch around their FMAs), not computed on zeros: at batch 1 a 4-bit
     kernel does one FMA per weight, not eight.
  2. Lanes over k. `lanes` threads (threadIdx.x) split each row of W; per step a thread loads 16
     consecutive bytes (one 128-bit load: 8 float16 weights, 4 float32, or 4 words of codes =
     one group of 32 int4 / 40 int3 codes) of each of its rows, so the lanes of a row read 256
     contiguous bytes and a warp's loads are whole cache lines. Each thread keeps float32
     partial sums; a warp-shuffle reduction across the lanes (rfactor, then TVM's allreduce)
     finishes each output.
  3. Rows. A thread takes `rows_per_thread` rows (x is loaded once for all of them);
     threadIdx.y and blockIdx.x cover the rest. Rows per block are chosen so that at batch 1
     the kernel launches at least MIN_BLOCKS blocks (2 per SM of a 132-SM H100/H200).
  4. Registers. The 16 loaded bytes, the unpacked float32 weights of one storage word (or one
     vector) for the thread's rows, and tile * rows_per_thread accumulators are small arrays in
     fully unrolled loops, which nvcc keeps in registers. The loops are emitted as
     `#pragma unroll` loops, not expanded by TVM, so each kernel's source stays a few KiB.
  5. Epilogue. The reduced outputs go to shared memory; the bias, SiLU and residual of a
     ResBlock (or the copy out of the padded tile) run right after in the same kernel, one
     output per thread, masked to the real batch rows.

Unpacking: centred_code turns a code into (code - max_int) exactly with integer logic and float
FMAs, without the integer-to-float conversion that runs at 1/8 of the FMA rate on NVIDIA GPUs;
the values, and float32 accumulation, are those of the CPU kernels.
"""

from __future__ import annotations

import dataclasses

import tvm
import tvm_ffi
from tvm import tirx
from tvm.s_tir import Schedule, ScheduleError

from .cpu_schedule import find_gemvs
from .kernels import SCHEDULE_ATTR
from .model import WEIGHT_STAGE
from .prim_funcs import rewrite_prim_funcs

# Batch rows one pass over W serves: batches up to this read W once per call.
MAX_TILE = 8
# Threads per row of W (threadIdx.x): 16 x 16 bytes = 256 contiguous bytes of a row per step;
# a power of two up to the warp, so the cross-lane sum is 4 warp shuffles.
LANES = 16
# Rows of W per thread: x is loaded and converted once for this many rows.
ROWS_PER_THREAD = 4
# Bytes of W a thread loads per row and step: one 128-bit load.
VECTOR_BYTES = 16
# Blocks a kernel launches at batch 1, at least: 2 per SM of a 132-SM H100/H200, so no SM idles
# and each has a second block to switch to.
MIN_BLOCKS = 264
# Rows per block, largest first: the first that still gives MIN_BLOCKS blocks (for vocab 32000:
# 32 rows, 1000 blocks of 128 threads; for hidden 4096: 8 rows, 512 blocks of 32 threads).
ROWS_PER_BLOCK = (32, 16, 8, 4)


@dataclasses.dataclass(frozen=True)
class GemvPlan:
    """How one GEMV kernel is cut up (a kernel report's `schedule` names it)."""

    tile: int  # batch rows per pass over W (blockIdx.y takes the tiles)
    lanes: int  # threads per row of W (threadIdx.x)
    rows_per_thread: int
    rows_per_block: int  # rows_per_thread * threadIdx.y
    chunk: int  # elements of k a thread takes per row and step (one 16-byte load)
    per_word: int  # elements of k per loaded element of W: codes per word, 1 for plain weights

    @property
    def threads_y(self) -> int:
        return self.rows_per_block // self.rows_per_thread

    def describe(self) -> str:
        return (f"medusa GEMV: tile {self.tile}, {self.rows_per_block} rows x {self.lanes} "
                f"lanes, {self.rows_per_thread} rows/thread")


def _stage_source(stage_block, k_var) -> tuple[int, int]:
    """(index among the stage's reads, elements of k per element) of the weight the stage reads:
    the buffer indexed [j, k // per_word] (packed codes) or [j, k] (plain weights)."""
    for index, region in enumerate(stage_block.reads):
        found: list[int] = []

        def visit(load, region=region, found=found) -> None:
            if not load.source.same_as(region.source) or len(load.indices) != 2:
                return
            last = load.indices[-1]
            if last.same_as(k_var):
                found.append(1)
            elif (isinstance(last, tirx.FloorDiv) and last.a.same_as(k_var)
                  and isinstance(last.b, tirx.IntImm) and str(load.source.dtype).startswith("uint")):
                found.append(int(last.b))

        tvm_ffi.structural_walk(stage_block.body, (tvm.ir.expr.TensorLoad, visit))
        if found:
            return index, found[0]
    raise ValueError("the weight stage reads no [out, in] weight")


def plan_gemv(out_features: int, in_features: int, weight_dtype: str, per_word: int) -> GemvPlan:
    """The plan for a GEMV of [out_features, in_features] whose stored weight has `weight_dtype`."""
    itemsize = tvm.runtime.DataType(weight_dtype).bits // 8
    chunk = VECTOR_BYTES // itemsize * per_word
    rows = next((r for r in ROWS_PER_BLOCK if -(-out_features // r) >= MIN_BLOCKS),
                ROWS_PER_BLOCK[-1])
    # where the lanes' steps do not divide k, every element carries a bound check; with 4 rows
    # per thread the 4-bit kernels then spilled a few bytes (hidden 4100), with 2 they do not
    per_thread = ROWS_PER_THREAD if in_features % (LANES * chunk) == 0 else ROWS_PER_THREAD // 2
    # always MAX_TILE rows, whatever the max batch: TVM 0.27 sized the registers of padded tiles
    # of 2 and 3 rows from the batch (a build error) and a tile of 1 pads nothing; rows past
    # the batch cost a skipped branch, and the registers of 8 rows
    return GemvPlan(tile=MAX_TILE, lanes=LANES, rows_per_thread=min(per_thread, rows),
                    rows_per_block=rows, chunk=chunk, per_word=per_word)


def schedule_gemv_func(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """`func` (one Linear of model.py, on a GPU: weight stage, GEMV, elementwise tail) with the
    schedule above, or None if it is not of that form (dlight's rules then take it)."""
    gemvs = find_gemvs(func)
    if len(gemvs) != 1:
        return None
    gemv = gemvs[0]
    sch = Schedule(func)
    try:
        stage = sch.get_sblock(WEIGHT_STAGE)
    except (ScheduleError, ValueError, tvm.error.TVMError):
        return None
    stage_block = sch.get(stage)
    source_index, per_word = _stage_source(stage_block, stage_block.iter_vars[1].var)
    weight = stage_block.reads[source_index].source
    plan = plan_gemv(gemv.out_features, int(gemv.loops[2].extent), str(weight.dtype), per_word)
    try:
        _schedule(sch, gemv.block.name_hint, stage, source_index, plan)
        guarded = _skip_padded_rows(sch, gemv.block.name_hint, plan, gemv.loops[0].extent)
    except ScheduleError:
        return None  # a shape the recipe does not fit: dlight's rules (the report names them)
    return guarded.with_attr("tirx.is_scheduled", True).with_attr(SCHEDULE_ATTR, plan.describe())


def _root_blocks(sch: Schedule) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _schedule(sch: Schedule, name: str, stage, source_index: int, plan: GemvPlan) -> None:
    block = sch.get_sblock(name)
    before = {sch.get(b).name_hint for b in _root_blocks(sch)}
    # batch padded to whole tiles: an input pad block (inlined below: a masked read of x) and
    # the GEMV's output in a padded buffer with a copy out (the tail)
    sch.pad_einsum(block, [plan.tile, 1, 1])
    blocks = _root_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    position = names.index(name)
    for producer in blocks[:position]:
        if sch.get(producer).name_hint not in before:
            sch.compute_inline(producer)
    tail = _root_blocks(sch)[[sch.get(b).name_hint for b in _root_blocks(sch)].index(name) + 1:]

    i, j, k = sch.get_loops(block)
    tile_o, tile_i = sch.split(i, [None, plan.tile])
    bx, ty, row = sch.split(j, [None, plan.threads_y, plan.rows_per_thread])
    step, lane, chunk = sch.split(k, [None, plan.lanes, plan.chunk])
    # partial sums per lane, in registers; `block` then sums them across the lanes
    partial = sch.rfactor(lane, factor_axis=0)
    tile_o, tile_i, bx, ty, row, step, lane, chunk = sch.get_loops(partial)
    word, element = sch.split(chunk, [None, plan.per_word])
    sch.reorder(tile_o, bx, ty, lane, step, word, tile_i, element, row)
    sch.bind(tile_o, "blockIdx.y")
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.bind(lane, "threadIdx.x")
    for loop in (word, tile_i, element, row):
        sch.unroll(loop)
    # `#pragma unroll` loops in the source rather than TVM expanding them
    sch.annotate(lane, "pragma_unroll_explicit", 0)
    sch.set_scope(partial, 0, "local")
    sch.decompose_reduction(partial, step)

    # the weights of one word (or vector) for the thread's rows, unpacked once per step
    sch.compute_at(stage, word, preserve_unit_loops=True)
    sch.set_scope(stage, 0, "local")
    for loop in sch.get_loops(stage)[-2:]:
        sch.unroll(loop)
    # the 16 bytes of each row a thread reads per step, as one vector load
    loaded = sch.cache_read(stage, source_index, "local")
    sch.compute_at(loaded, step, preserve_unit_loops=True)
    rows_loop, vector_loop = sch.get_loops(loaded)[-2:]
    sch.unroll(rows_loop)
    sch.vectorize(vector_loop)

    # the sum across lanes, into shared memory for the tail
    sch.reverse_compute_at(block, ty, preserve_unit_loops=True)
    sch.set_scope(block, 0, "shared")
    lane_sum, sum_tile, sum_row = sch.get_loops(block)[-3:]
    sch.reorder(sum_tile, sum_row, lane_sum)
    sch.bind(lane_sum, "threadIdx.x")
    # the tail (copy out of the padded tile, bias, SiLU, residual) in one block, one output per
    # thread; TVM masks it to the batch's rows
    for consumer in tail[:-1]:
        sch.compute_inline(consumer)
    last = tail[-1]
    sch.reverse_compute_at(last, ty, preserve_unit_loops=True)
    out_tile, out_row = sch.get_loops(last)[-2:]
    _, out_lane = sch.split(sch.fuse(out_tile, out_row), [None, plan.lanes])
    sch.bind(out_lane, "threadIdx.x")


def _skip_padded_rows(sch: Schedule, name: str, plan: GemvPlan, batch) -> tirx.PrimFunc:
    """The scheduled function with each tile row's FMAs and lane sum under `if row < batch`.

    Done on the finished function, not with a block predicate: the register and shared arrays
    are sized from their accesses, and a predicate would make that size depend on the batch.
    """
    partial_update = sch.get_sblock(f"{name}_rf_update")
    tile_o = sch.get(sch.get_loops(partial_update)[0]).loop_var
    guarded_loops = {
        sch.get(sch.get_loops(partial_update)[-3]).loop_var,  # tile_i of the FMAs
        sch.get(sch.get_loops(sch.get_sblock(name))[-3]).loop_var,  # tile_i of the lane sums
    }
    func = sch.mod["main"]

    def guard(loop: tirx.For) -> tirx.For:
        if not any(loop.loop_var.same_as(v) for v in guarded_loops):
            return loop
        body = tirx.IfThenElse(tile_o * plan.tile + loop.loop_var < batch, loop.body, None)
        return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, body,
                        loop.thread_binding, loop.annotations)

    return func.with_body(tvm_ffi.structural_map(func.body, (tirx.For, guard)))


def schedule_gpu_kernels(mod: tvm.IRModule) -> tvm.IRModule:
    """Schedule every GEMV PrimFunc of `mod` (a GPU build of model.py, after FuseTIR) as
    described above; other functions are left for dlight's rules."""
    return rewrite_prim_funcs(mod, schedule_gemv_func)


@tvm.transform.module_pass(opt_level=0, name="medusa.ScheduleGPUKernels")
def schedule_gpu_kernels_pass(mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """schedule_gpu_kernels as a module pass."""
    return schedule_gpu_kernels(mod)
