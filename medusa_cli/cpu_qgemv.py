"""The 4-bit group-quantized Linear as a hand-written TIR kernel for x86 CPUs with AVX-512.

At batch 1 to 8 an int4 GEMV on a CPU is bound by unpacking, not by memory: the generic schedule
(cpu_schedule.py) spends about seven vector instructions per uint32 word (broadcast, shift, mask,
centre, convert, scale, multiply-add). This kernel dequantizes with a table lookup instead:

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

Parallel work is cut into CHUNKS tasks of consecutive output rows. The accumulators, the table
and the weights are small buffers of the default ("global") scope declared once per task: TVM
0.27 puts such buffers under 1 KiB on the stack, where LLVM keeps them in registers, while it
turns every "local"-scope buffer into heap workspace (an allocation call per use, and every
multiply-add a load and a store: 2.5x slower in a full library). Rows go in steps of two: full
tiles of BATCH_TILE batch rows read each x vector once for both rows, and the batch rows left
over go one at a time, one output row at a time, with more independent accumulators.

Used by `medusa compile` for CPU targets whose features include AVX-512 (see `supported`);
everything else keeps the generic schedule.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .quant import QuantScheme

# codes per vector: two uint32 words of eight 4-bit codes
LANES = 16
# batch rows per full tile, each tile multiplying two output rows
BATCH_TILE = 4
# parallel tasks (consecutive output rows each); TVM splits them among its threads
CHUNKS = 64


def supported(target, scheme: QuantScheme, in_features: int, out_features: int) -> bool:
    """Whether this kernel computes a Linear of this scheme and shape on this target."""
    from tvm.target import codegen

    if target is None or target.kind.name != "llvm":
        return False
    return (
        scheme.is_quantized
        and scheme.bits == 4
        and scheme.storage_dtype == "uint32"
        and scheme.group_size % LANES == 0
        and in_features % scheme.group_size == 0
        and out_features % 2 == 0
        and bool(codegen.target_has_features("avx512f", target))
    )


def gemv_kernel(in_features: int, out_features: int, scheme: QuantScheme, x_dtype: str,
                scale_dtype: str):
    """PrimFunc (x [batch, in] x_dtype, q_weight [out, in / 8] uint32, q_scale [out, groups]
    scale_dtype, y [batch, out] float32): y = x @ ((code - max_int) * scale).T, accumulated in
    float32. Call it only where `supported` is true."""
    n, k = out_features, in_features
    words = k // 8
    pairs = k // LANES
    groups = k // scheme.group_size
    pairs_per_group = scheme.group_size // LANES
    max_int = scheme.max_int
    chunks = min(CHUNKS, n // 2)
    steps_per_chunk = -(-(n // 2) // chunks)  # two output rows per step

    def slot_count(groups_per_step: int, accumulators: int) -> int:
        return min(groups_per_step * pairs_per_group, accumulators)

    # (rows, batch rows, groups per loop step, independent accumulators per row and batch row).
    # Each tile kind has its own accumulator buffer, under the 1 KiB that TVM allocates on the
    # stack (module docstring).
    single = (1, 1, 2 if groups % 2 == 0 else 1, 4)
    tiled = (2, BATCH_TILE, 1, 1)

    @T.macro
    def tile(x_lanes, q64, q_scale, y, acc, table, w, j0, b0, rows, nb, gs, slots):
        for s in T.unroll(rows * nb * slots):
            acc[T.Ramp(s * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
        for go, gi in T.grid(groups // gs, gs):
            for r in T.unroll(rows):
                table[T.Ramp(r * LANES, 1, LANES)] = T.Cast(
                    "float32x16", T.Ramp(-max_int, 1, LANES)
                ) * T.Broadcast(T.Cast("float32", q_scale[j0 + r, go * gs + gi]), LANES)
            for pp in T.unroll(pairs_per_group):
                for r in T.unroll(rows):
                    # lane l: the code at nibble l // 2 of word l % 2 of the pair, in bits 0-3
                    w[T.Ramp(0, 1, LANES)] = T.call_llvm_pure_intrin(
                        "float32x16",
                        "llvm.x86.avx512.permvar.sf.512",
                        table[T.Ramp(r * LANES, 1, LANES)],
                        T.reinterpret("int32x16", T.shift_right(
                            T.reinterpret("uint32x16",
                                          T.Broadcast(q64[j0 + r, (go * gs + gi) * pairs_per_group + pp], 8)),
                            T.shift_left(T.shift_right(T.Ramp(T.uint32(0), T.uint32(1), LANES),
                                                       T.Broadcast(T.uint32(1), LANES)),
                                         T.Broadcast(T.uint32(2), LANES)))),
                    )
                    for bi in T.unroll(nb):
                        acc[T.Ramp(((r * nb + bi) * slots + (gi * pairs_per_group + pp) % slots) * LANES, 1, LANES)] = (
                            acc[T.Ramp(((r * nb + bi) * slots + (gi * pairs_per_group + pp) % slots) * LANES, 1, LANES)]
                            + w[T.Ramp(0, 1, LANES)]
                            * x_lanes[b0 + bi, T.Ramp(((go * gs + gi) * pairs_per_group + pp) * LANES, 1, LANES)]
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

    single_slots = slot_count(single[2], single[3])
    tiled_slots = slot_count(tiled[2], tiled[3])

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
            with T.sblock("rows"):
                acc_single = T.sblock_alloc_buffer((single_slots * LANES,), "float32")
                acc_tiled = T.sblock_alloc_buffer((tiled[0] * tiled[1] * tiled_slots * LANES,),
                                                  "float32")
                table = T.sblock_alloc_buffer((2 * LANES,), "float32")
                w = T.sblock_alloc_buffer((LANES,), "float32")
                for step in range(steps_per_chunk):
                    if c * steps_per_chunk + step < n // 2:
                        for bt in range(batch // BATCH_TILE):
                            tile(x_lanes, q64, q_scale, y, acc_tiled, table, w,
                                 (c * steps_per_chunk + step) * 2, bt * BATCH_TILE,
                                 tiled[0], tiled[1], tiled[2], tiled_slots)
                        for br in range(batch % BATCH_TILE):
                            for r in range(2):
                                tile(x_lanes, q64, q_scale, y, acc_single, table, w,
                                     (c * steps_per_chunk + step) * 2 + r,
                                     batch // BATCH_TILE * BATCH_TILE + br,
                                     single[0], single[1], single[2], single_slots)

    return kernel
