"""The 4-bit group-quantized Linear as a hand-written TIR kernel for x86 CPUs with AVX-512.

At batch 1 to 8 an int4 GEMV on a CPU is bound by unpacking, not by memory: the generic schedule
spends about seven vector instructions per uint32 word (broadcast, shift, mask, centre,
convert, scale, multiply-add). Here dequantization is a table lookup:
  1. Per output row and group, a 16-entry table holds (c - max_int) * scale for every code c:
     one multiply per group.
  2. Two consecutive uint32 words (16 codes) are broadcast as one uint64 into 16 lanes and
     shifted so that lane l holds the code at nibble l // 2 of word l % 2 in its low four bits.
  3. vpermps (llvm.x86.avx512.permvar.sf.512) indexes the table with those four bits: 16
     dequantized float32 weights in one instruction, no masking, conversion or scaling.
  4. x is permuted once per call into the same lane order (x_lanes), so each 16 weights take
     one fused multiply-add per batch row.
Per 16 weights: broadcast, shift, permute, and one multiply-add per batch row, against about
fourteen instructions in the generic schedule. The weights are (c - max_int) * scale exactly in
float32, as model.GroupQuantLinear computes them everywhere else.

Plain weights keep the generic schedule: a kernel of this shape for them measured the same at
batch 1 (both at the memory floor) and 1.3x slower at batch 8.

Parallel work is cut into CHUNKS tasks of consecutive output rows,
taken a step of rows at a time: full tiles of BATCH_TILE batch rows multiply a few output rows
together (each x vector loaded once for all of them), and the batch rows left over go one at a
time with more independent accumulators. The accumulators and scratch vectors are small buffers
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

from .quant import QuantScheme

# weights per vector: float32 lanes of one 512-bit register
LANES = 16
# batch rows per full tile
BATCH_TILE = 4
# parallel tasks (consecutive output rows each); TVM splits them among its threads
CHUNKS = 64


@dataclasses.dataclass(frozen=True)
class _Tile:
    rows: int  # output rows multiplied together
    batch: int  # batch rows
    blocks: int  # quantization groups per loop step
    slots: int  # independent accumulators per output row and batch row


@dataclasses.dataclass(frozen=True)
class _Shape:
    n: int  # output rows
    k: int  # input features
    block_vectors: int  # vectors per group: its pairs of uint32 words
    step_rows: int  # output rows per step; a multiple of both tiles' rows
    single: _Tile
    tiled: _Tile

    @property
    def blocks(self) -> int:
        return self.k // (self.block_vectors * LANES)


def supported(target, scheme: QuantScheme, in_features: int, out_features: int) -> bool:
    """Whether this kernel computes a Linear of this scheme and shape on this target."""
    from tvm.target import codegen

    if target is None or target.kind.name != "llvm" or not scheme.is_quantized:
        return False
    return (scheme.bits == 4 and scheme.storage_dtype == "uint32"
            and scheme.group_size % LANES == 0 and in_features % scheme.group_size == 0
            and out_features % _shape(in_features, out_features, scheme).step_rows == 0
            and bool(codegen.target_has_features("avx512f", target)))


def _shape(k: int, n: int, scheme: QuantScheme) -> _Shape:
    groups = k // scheme.group_size
    # batch 1 to 3: one row at a time, four accumulators; tiles: 2 rows x 4 batch rows
    single = _Tile(rows=1, batch=1, blocks=2 if groups % 2 == 0 else 1, slots=4)
    tiled = _Tile(rows=2, batch=BATCH_TILE, blocks=1, slots=1)
    return _Shape(n, k, scheme.group_size // LANES, 2, single, tiled)


def _slots(shape: _Shape, tile: _Tile) -> int:
    return min(tile.blocks * shape.block_vectors, tile.slots)


def _skeleton(shape: _Shape, max_int: int):
    """The macro computing every output row of task c for every batch row. q64: the weights as
    [n, pairs] uint64; x_lanes: x as float32 in the weights' lane order."""
    n, blocks, bv = shape.n, shape.blocks, shape.block_vectors
    chunks = min(CHUNKS, n // shape.step_rows)
    steps_per_chunk = -(-(n // shape.step_rows) // chunks)
    single, tiled = shape.single, shape.tiled
    single_slots, tiled_slots = _slots(shape, single), _slots(shape, tiled)

    @T.macro
    def tile(x_lanes, q64, q_scale, y, acc, table, w, j0, b0, rows, nb, gs, slots):
        for s in T.unroll(rows * nb * slots):
            acc[T.Ramp(s * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
        for go, gi in T.grid(blocks // gs, gs):
            for r in T.unroll(rows):
                table[T.Ramp(r * LANES, 1, LANES)] = T.Cast(
                    "float32x16", T.Ramp(-max_int, 1, LANES)
                ) * T.Broadcast(T.Cast("float32", q_scale[j0 + r, go * gs + gi]), LANES)
            for v in T.unroll(bv):
                for r in T.unroll(rows):
                    # lane l: the code at nibble l // 2 of word l % 2 of the pair, in bits 0-3
                    w[T.Ramp(r * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                        "float32x16",
                        "llvm.x86.avx512.permvar.sf.512",
                        table[T.Ramp(r * LANES, 1, LANES)],
                        T.reinterpret("int32x16", T.shift_right(
                            T.reinterpret("uint32x16",
                                          T.Broadcast(q64[j0 + r, (go * gs + gi) * bv + v], 8)),
                            T.shift_left(T.shift_right(T.Ramp(T.uint32(0), T.uint32(1), LANES),
                                                       T.Broadcast(T.uint32(1), LANES)),
                                         T.Broadcast(T.uint32(2), LANES)))),
                    )
                for bi in T.unroll(nb):
                    for r in T.unroll(rows):
                        acc[T.Ramp(((r * nb + bi) * slots + (gi * bv + v) % slots) * LANES, 1, LANES)] = (
                            acc[T.Ramp(((r * nb + bi) * slots + (gi * bv + v) % slots) * LANES, 1, LANES)]
                            + w[T.Ramp(r * LANES, 1, LANES)]
                            * x_lanes[b0 + bi, T.Ramp(((go * gs + gi) * bv + v) * LANES, 1, LANES)]
                        )
        for r in T.unroll(rows):
            for bi in T.unroll(nb):
                for s in T.unroll(1, slots):
                    acc[T.Ramp((r * nb + bi) * slots * LANES, 1, LANES)] = (
                        acc[T.Ramp((r * nb + bi) * slots * LANES, 1, LANES)]
                        + acc[T.Ramp(((r * nb + bi) * slots + s) * LANES, 1, LANES)]
                    )
                y[b0 + bi, j0 + r] = T.call_llvm_pure_intrin(
                    "float32", "llvm.vector.reduce.fadd.v16f32", T.float32(0),
                    acc[T.Ramp((r * nb + bi) * slots * LANES, 1, LANES)],
                )

    @T.macro
    def rows_of_task(x_lanes, q64, q_scale, y, batch, c):
        with T.sblock("rows"):
            acc_single = T.sblock_alloc_buffer((single.rows * single_slots * LANES,), "float32")
            acc_tiled = T.sblock_alloc_buffer((tiled.rows * tiled.batch * tiled_slots * LANES,),
                                              "float32")
            table = T.sblock_alloc_buffer((max(single.rows, tiled.rows) * LANES,), "float32")
            w = T.sblock_alloc_buffer((max(single.rows, tiled.rows) * LANES,), "float32")
            for step in range(steps_per_chunk):
                if c * steps_per_chunk + step < n // shape.step_rows:
                    for bt in range(batch // BATCH_TILE):
                        for sub in range(shape.step_rows // tiled.rows):
                            tile(x_lanes, q64, q_scale, y, acc_tiled, table, w,
                                 (c * steps_per_chunk + step) * shape.step_rows + sub * tiled.rows,
                                 bt * BATCH_TILE, tiled.rows, tiled.batch, tiled.blocks,
                                 tiled_slots)
                    for br in range(batch % BATCH_TILE):
                        for sub in range(shape.step_rows // single.rows):
                            tile(x_lanes, q64, q_scale, y, acc_single, table, w,
                                 (c * steps_per_chunk + step) * shape.step_rows + sub * single.rows,
                                 batch // BATCH_TILE * BATCH_TILE + br, single.rows, single.batch,
                                 single.blocks, single_slots)

    return rows_of_task, chunks


def gemv_kernel(in_features: int, out_features: int, scheme: QuantScheme, x_dtype: str,
                scale_dtype: str):
    """PrimFunc (x [batch, in] x_dtype, q_weight [out, in / 8] uint32, q_scale [out, groups]
    scale_dtype, y [batch, out] float32): y = x @ ((code - max_int) * scale).T, accumulated in
    float32. Call it only where `supported` is true."""
    n, k = out_features, in_features
    shape = _shape(k, n, scheme)
    rows_of_task, chunks = _skeleton(shape, scheme.max_int)
    words, pairs, groups = k // 8, k // LANES, k // scheme.group_size

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_x: T.handle, q_weight: T.Buffer((n, words), "uint32"),
               q_scale: T.Buffer((n, groups), scale_dtype), var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch = T.int64()
        x = T.match_buffer(var_x, (batch, k), x_dtype)
        y = T.match_buffer(var_y, (batch, n), "float32")
        x_lanes = T.sblock_alloc_buffer((batch, k), "float32")
        q64 = T.decl_buffer((n, pairs), "uint64", data=q_weight.data)
        with T.sblock("x_lanes"):
            # lane 2i + h of pair p multiplies the code at nibble i of word 2p + h
            for b, p, i, h in T.grid(batch, pairs, 8, 2):
                x_lanes[b, p * LANES + i * 2 + h] = T.Cast("float32", x[b, (p * 2 + h) * 8 + i])
        for c in T.parallel(chunks):
            rows_of_task(x_lanes, q64, q_scale, y, batch, c)

    return kernel
