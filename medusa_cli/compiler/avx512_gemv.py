"""The 4-bit group-quantized Linear as a hand-written TIR kernel for x86 CPUs with AVX-512.

At batch 1 to 8 an int4 GEMV on a CPU is bound by unpacking, not by memory: the generic schedule
spends about seven vector instructions per uint32 word (broadcast, shift, mask, centre,
convert, scale, multiply-add). Here each lane of a vector unpacks its own word:
  1. A block is 16 consecutive uint32 words of one output row (128 codes), one word per lane
     of a 512-bit load. Where in_features is not a multiple of 128, a last, partial block
     loads the words left and repeats the last one over the other lanes, whose x is zero.
  2. For nibble i = 0..7: shift the vector right by 4 i (one shift for 16 codes), then vpermps
     (llvm.x86.avx512.permvar.sf.512) looks the low four bits up in the constant table
     code - max_int: 16 centred weights as float32, no masking or conversion.
  3. One multiply-add per batch row against x, which is permuted once per call into the same
     order (x_lanes: lane l of nibble i multiplies input 8 l + i of the block).
  4. A word never straddles a group, so each lane's partial sum has one scale: after the
     eight nibbles, one multiply-add applies the 16 lanes' scales (the block's groups,
     converted and spread over their lanes) to the running accumulator.
Per 128 weights at batch 1: 7 shifts, 8 lookups, 8 multiply-adds and about 5 instructions for
the scales and the sum, about 28 in all, against about 36 when a 16-entry table of (c - max_int) * scale was rebuilt per
group and indexed after a variable shift (1.2x slower for one vocab projection). The sum is
the same as with the weights (c - max_int) * scale in float32, scaled per word instead of per
weight.

Plain weights keep the generic schedule: a table-free kernel of this shape for them measured
the same at batch 1 (both at the memory floor) and 1.3x slower at batch 8.

Parallel work is cut into CHUNKS tasks of consecutive output rows, which TVM's thread pool splits
evenly among its threads. A task takes a step of rows at a time: full
tiles of BATCH_TILE batch rows multiply a few output rows together (each x vector loaded once
for all of them), and the batch rows left over go one at a time with more independent
accumulators. The accumulators and scratch vectors are small buffers
of the default ("global") scope declared once per task: TVM 0.27 puts such buffers under 1 KiB
on the stack, where LLVM always keeps them in registers, while it turns every "local"-scope
buffer into heap workspace (an allocation call per task), which stays in registers only where
LLVM can prove it aliases nothing else. In a library built before compile.py marked the shape
functions noalias (see _mark_shape_functions_noalias) it could not, and every multiply-add was
a load and a store: 2.5x slower.

Used by `medusa compile` for CPU targets whose features include AVX-512 (see `supported`);
everything else keeps the generic schedule.
"""

from __future__ import annotations

import dataclasses

from tvm.script import tirx as T

from ..quantization import QuantScheme

# weights per vector: float32 lanes of one 512-bit register
LANES = 16
# codes per block: one uint32 word of 8 codes per lane
BLOCK = LANES * 8
# batch rows per full tile
BATCH_TILE = 4
# parallel tasks (consecutive output rows each); TVM splits them among its threads
CHUNKS = 64
# output rows per step of a task: a multiple of both tiles' rows
STEP_ROWS = 2


@dataclasses.dataclass(frozen=True)
class _Tile:
    rows: int  # output rows multiplied together
    batch: int  # batch rows
    slots: int  # independent partial sums per output row and batch row, cycled over nibbles


# batch 1 to 3: one row at a time, two partial sums; full tiles: 2 rows x 4 batch rows
_SINGLE = _Tile(rows=1, batch=1, slots=2)
_TILED = _Tile(rows=2, batch=BATCH_TILE, slots=1)


def supported(target, scheme: QuantScheme, in_features: int, out_features: int) -> bool:
    """Whether this kernel computes a Linear of this scheme and shape on this target."""
    from tvm.target import codegen

    if target is None or target.kind.name != "llvm" or not scheme.is_quantized:
        return False
    group = scheme.group_size
    return (scheme.bits == 4 and scheme.storage_dtype == "uint32"
            and group % 8 == 0 and (BLOCK % group == 0 or group % BLOCK == 0)
            and in_features % group == 0
            and out_features % STEP_ROWS == 0
            and bool(codegen.target_has_features("avx512f", target)))


def _lanes_from(buffer, row, first: int, count: int, picks: list[int]):
    """A 16-lane vector whose lane l is buffer[row, first + picks[l]], from one load of `count`
    contiguous elements (a vector shuffle then spreads them over the lanes)."""
    if count == 1:
        return T.Broadcast(buffer[row, first], LANES)
    loaded = buffer[row, T.Ramp(first, 1, count)]
    # a shuffle picks from the concatenation of its inputs, as many lanes as they have together
    return T.Shuffle([loaded] * -(-LANES // count), picks)


def _block_words(q_weight, row, block, row_words: int | None):
    """uint32x16: the words of `block` of `row`, one per lane. row_words (the row's word count)
    only for a last, partial block: its lanes past the row's end repeat the row's last word, and
    meet zeros in x_lanes."""
    count = LANES if row_words is None else row_words - block * LANES
    return _lanes_from(q_weight, row, block * LANES, count, [min(l, count - 1) for l in range(LANES)])


def _lane_scales(q_scale, row, block, group: int, groups: int | None):
    """float32x16: the scale of each lane's word in `block` of `row` (a block covers
    BLOCK // group groups, or lies inside one). groups (the row's group count) only for a last,
    partial block, whose lanes past the row's end take its last scale."""
    first = block * BLOCK // group
    count = max(1, BLOCK // group) if groups is None else groups - first
    words_per_group = group // 8
    return T.Cast("float32x16", _lanes_from(
        q_scale, row, first, count, [min(l // words_per_group, count - 1) for l in range(LANES)]))


def _skeleton(k: int, n: int, group: int, max_int: int):
    """The macro computing every output row of task c for every batch row, and the task count.
    x_lanes: x as float32 in the weights' lane order."""
    blocks = k // BLOCK
    # a last, partial block holds the row's remaining words (in_features not a multiple of 128)
    partial = k % BLOCK > 0
    chunks = min(CHUNKS, n // STEP_ROWS)
    steps_per_chunk = -(-(n // STEP_ROWS) // chunks)

    def vec(buffer, index):
        return buffer[T.Ramp(index * LANES, 1, LANES)]

    @T.macro
    def block(x_lanes, q_weight, q_scale, acc, part, scales, w, words, j0, b0, rows, nb, slots,
              blk, last):
        for s in T.unroll(rows * nb * slots):
            part[T.Ramp(s * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
        for r in T.unroll(rows):
            words[T.Ramp(r * LANES, 1, LANES)] = _block_words(q_weight, j0 + r, blk,
                                                              k // 8 if last else None)
        for nib in T.unroll(8):
            for r in T.unroll(rows):
                # nibble `nib` of every lane's word in bits 0-3, looked up as code - max_int
                w[T.Ramp(r * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                    "float32x16", "llvm.x86.avx512.permvar.sf.512",
                    T.Cast("float32x16", T.Ramp(-max_int, 1, LANES)),
                    T.reinterpret("int32x16", T.shift_right(
                        vec(words, r), T.Broadcast(T.Cast("uint32", nib * 4), LANES))),
                )
            for bi in T.unroll(nb):
                for r in T.unroll(rows):
                    part[T.Ramp(((r * nb + bi) * slots + nib % slots) * LANES, 1, LANES)] = (
                        vec(part, (r * nb + bi) * slots + nib % slots)
                        + vec(w, r) * x_lanes[b0 + bi, T.Ramp(blk * BLOCK + nib * LANES, 1, LANES)]
                    )
        for r in T.unroll(rows):
            scales[T.Ramp(r * LANES, 1, LANES)] = _lane_scales(q_scale, j0 + r, blk, group,
                                                               k // group if last else None)
        for r in T.unroll(rows):
            for bi in T.unroll(nb):
                for s in T.unroll(1, slots):
                    part[T.Ramp((r * nb + bi) * slots * LANES, 1, LANES)] = (
                        vec(part, (r * nb + bi) * slots) + vec(part, (r * nb + bi) * slots + s)
                    )
                acc[T.Ramp((r * nb + bi) * LANES, 1, LANES)] = (
                    vec(acc, r * nb + bi) + vec(part, (r * nb + bi) * slots) * vec(scales, r)
                )

    @T.macro
    def tile(x_lanes, q_weight, q_scale, y, acc, part, scales, w, words, j0, b0, rows, nb, slots):
        for s in T.unroll(rows * nb):
            acc[T.Ramp(s * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
        for blk in range(blocks):
            block(x_lanes, q_weight, q_scale, acc, part, scales, w, words, j0, b0, rows, nb, slots,
                  blk, False)
        if partial:  # a Python constant: the parser keeps or drops this
            block(x_lanes, q_weight, q_scale, acc, part, scales, w, words, j0, b0, rows, nb, slots,
                  blocks, True)
        for r in T.unroll(rows):
            for bi in T.unroll(nb):
                y[b0 + bi, j0 + r] = T.call_llvm_pure_intrin(
                    "float32", "llvm.vector.reduce.fadd.v16f32", T.float32(0), vec(acc, r * nb + bi),
                )

    single, tiled = _SINGLE, _TILED
    most_rows = max(single.rows, tiled.rows)

    @T.macro
    def rows_of_task(x_lanes, q_weight, q_scale, y, batch, c):
        with T.sblock("rows"):
            acc_single = T.sblock_alloc_buffer((single.rows * LANES,), "float32")
            part_single = T.sblock_alloc_buffer((single.rows * single.slots * LANES,), "float32")
            acc_tiled = T.sblock_alloc_buffer((tiled.rows * tiled.batch * LANES,), "float32")
            part_tiled = T.sblock_alloc_buffer((tiled.rows * tiled.batch * tiled.slots * LANES,),
                                               "float32")
            scales = T.sblock_alloc_buffer((most_rows * LANES,), "float32")
            w = T.sblock_alloc_buffer((most_rows * LANES,), "float32")
            words = T.sblock_alloc_buffer((most_rows * LANES,), "uint32")
            for step in range(steps_per_chunk):
                if c * steps_per_chunk + step < n // STEP_ROWS:
                    for bt in range(batch // BATCH_TILE):
                        for sub in range(STEP_ROWS // tiled.rows):
                            tile(x_lanes, q_weight, q_scale, y, acc_tiled, part_tiled, scales, w, words,
                                 (c * steps_per_chunk + step) * STEP_ROWS + sub * tiled.rows,
                                 bt * BATCH_TILE, tiled.rows, tiled.batch, tiled.slots)
                    for br in range(batch % BATCH_TILE):
                        for sub in range(STEP_ROWS // single.rows):
                            tile(x_lanes, q_weight, q_scale, y, acc_single, part_single, scales, w,
                                 words, (c * steps_per_chunk + step) * STEP_ROWS + sub * single.rows,
                                 batch // BATCH_TILE * BATCH_TILE + br, single.rows, single.batch,
                                 single.slots)

    return rows_of_task, chunks


def gemv_kernel(in_features: int, out_features: int, scheme: QuantScheme, x_dtype: str,
                scale_dtype: str):
    """PrimFunc (x [batch, in] x_dtype, q_weight [out, in / 8] uint32, q_scale [out, groups]
    scale_dtype, y [batch, out] float32): y = x @ ((code - max_int) * scale).T, accumulated in
    float32. Call it only where `supported` is true."""
    n, k = out_features, in_features
    rows_of_task, chunks = _skeleton(k, n, scheme.group_size, scheme.max_int)
    words, groups = k // 8, k // scheme.group_size
    padded_blocks = -(-k // BLOCK)  # the last one partial where k is not a multiple of BLOCK

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_x: T.handle, q_weight: T.Buffer((n, words), "uint32"),
               q_scale: T.Buffer((n, groups), scale_dtype), var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch = T.int64()
        x = T.match_buffer(var_x, (batch, k), x_dtype)
        y = T.match_buffer(var_y, (batch, n), "float32")
        x_lanes = T.sblock_alloc_buffer((batch, padded_blocks * BLOCK), "float32")
        with T.sblock("x_lanes"):
            # lane l of nibble i of a block multiplies the code at nibble i of the block's word l
            for b, blk, i, lane in T.grid(batch, padded_blocks, 8, LANES):
                if blk * BLOCK + lane * 8 + i < k:
                    x_lanes[b, blk * BLOCK + i * LANES + lane] = T.Cast(
                        "float32", x[b, blk * BLOCK + lane * 8 + i])
                else:  # past the row's end in a partial block: lanes that must add nothing
                    x_lanes[b, blk * BLOCK + i * LANES + lane] = T.float32(0)
        for c in T.parallel(chunks):
            rows_of_task(x_lanes, q_weight, q_scale, y, batch, c)

    return kernel
