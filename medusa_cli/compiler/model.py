"""The Medusa heads as a Relax module, written with tvm.relax.frontend.nn.

Each head is `medusa_num_layers` ResBlocks (x + SiLU(Linear(x))) followed by a bias-free
Linear(hidden, vocab). `get_logits(hidden_states)` returns one float32 [batch, vocab] tensor per
head. Parameter names are spec.py's (compile_library checks they agree).

Every Linear computes x @ W.T as a single te.compute whose reduction reads W in its stored
[out, in] layout, so no pass has to fuse a transpose and no float weight is ever rebuilt:
  - plain schemes read W directly;
  - group-quantized schemes unpack each code from q_weight and scale it inside the reduction.
Products are accumulated in float32 whatever the model dtype: a float16 accumulator was measured
to lose 0.05 on logits of scale 3 at the vicuna-7b shape (reductions over 4096).
On GPUs (gpu=True) each Linear computes the same values in the form gpu_schedule.py schedules:
the float32 weight in a stage of its own, codes unpacked by centred_code (no integer-to-float
conversion), and k not padded to whole groups; the tree's top-k is gpu_topk.py's, over the base
logits' and the heads' rows at once.

Given a Medusa tree (TreeSpec), the module also has get_tree_candidates(base_logits,
hidden_states), tree.generate_candidates computed in the library (top-k kernels in topk.py), and
get_tree_buffers(), the tree's buffers as constants.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn

from ..quantization import QuantScheme
from ..spec import MedusaConfig
from ..trees import MedusaTree, TreeBuffers, build_buffers
from . import avx512_gemv, gpu_topk
from .gpu_topk import GpuTopkLayout
from .topk import TopkLayout, chunk_kernel, merge_kernel

ACCUMULATE_DTYPE = "float32"
# The name of a Linear's weight stage on GPUs (see _nt_matmul), which gpu_schedule.py looks for.
WEIGHT_STAGE = "weight_f32"
# float32 whose bits are 0x4B000000 | m is 2**23 + m for any m < 2**23 (the exponent of 2**23,
# m as the mantissa): an integer becomes a float with integer logic and one float op, where a
# conversion instruction runs at 1/8 of the FMA rate on NVIDIA GPUs (16 vs 128 per SM and clock).
_MAGIC_BITS = 0x4B000000
_MAGIC_EXPONENT = 23


def _nt_matmul(x: te.Tensor, weight_at, in_features: int, out_features: int, bias: te.Tensor | None,
               out_dtype: str, reduce_extent: int | None = None,
               weight_stage: bool = False) -> te.Tensor:
    """out[i, j] = sum_k x[i, k] * weight_at(j, k) (+ bias[j]), accumulated in float32.

    weight_at(j, k) returns the weight element W[j, k] as a float32 expression. reduce_extent
    (> in_features) runs k over the packed rows' whole length, with x read as zero past
    in_features, so that k splits into whole words and groups.
    weight_stage: compute weight_at in a stage of its own ("weight_f32", [out, k]) that the
    reduction reads, so a GPU schedule (gpu_schedule.py) can place it in registers and unpack
    each weight once for every batch row; the values are the same.
    """
    batch = x.shape[0]
    extent = reduce_extent or in_features
    k = te.reduce_axis((0, extent), name="k")
    if weight_stage:
        staged = te.compute((out_features, extent), weight_at, name=WEIGHT_STAGE)
        weight_at = lambda j, k: staged[j, k]  # noqa: E731

    def x_at(i, k):
        if reduce_extent is None:
            return x[i, k].astype(ACCUMULATE_DTYPE)
        # past in_features: zero (the weight there is padding)
        return tirx.Select(k < in_features,
                           x[i, tirx.min(k, in_features - 1)].astype(ACCUMULATE_DTYPE),
                           tirx.const(0, ACCUMULATE_DTYPE))

    acc = te.compute(
        (batch, out_features),
        lambda i, j: te.sum(x_at(i, k) * weight_at(j, k), axis=k),
        name="NT_matmul",
    )
    return _epilogue(acc, bias, out_dtype)


def _epilogue(acc: te.Tensor, bias: te.Tensor | None, out_dtype: str) -> te.Tensor:
    """acc (+ bias) in out_dtype; acc itself when there is nothing to do."""
    if bias is None and out_dtype == ACCUMULATE_DTYPE:
        return acc

    def value(i, j):
        v = acc[i, j]
        if bias is not None:
            v = v + bias[j].astype(ACCUMULATE_DTYPE)
        return v.astype(out_dtype)

    return te.compute(acc.shape, value, name="NT_matmul_epilogue")


def centred_code(word, position, scheme: QuantScheme):
    """(code - max_int) as an exact float32 for the code at `position` of a storage word, without
    an integer-to-float conversion: three integer/float operations once `position` is a constant
    (the GPU schedule unrolls it), where (word >> shift & mask) - max_int, converted, costs a
    shift, a mask, a subtraction and a conversion at 1/8 rate.

    The code's field is masked where it lies (or after one shift down, for fields that end above
    bit 23), so the masked word is code * 2**e with e its lowest bit, below 2**23. OR-ing in
    _MAGIC_BITS gives the float32 2**23 + code * 2**e; times 2**-e (exact: a power of two) it is
    2**(23 - e) + code, and less 2**(23 - e) + max_int it is code - max_int, exactly, since both
    terms and the difference are integers below 2**24. tests/test_gpu_schedule.py checks every
    code at every position against the integer arithmetic.
    """
    storage = scheme.storage_dtype
    bits = scheme.bits
    # fields ending above bit 23 are shifted down by `high_shift` (a multiple of bits) first
    top = bits * scheme.per_storage
    high_shift = bits * -(-(top - _MAGIC_EXPONENT) // bits) if top > _MAGIC_EXPONENT else 0
    lowest = position * bits
    in_place = lowest + bits <= _MAGIC_EXPONENT
    exponent = tirx.Select(in_place, lowest, lowest - high_shift)  # e: the field's lowest bit
    source = tirx.Select(in_place, word, word >> tirx.const(high_shift, storage))
    field = source & (tirx.const((1 << bits) - 1, storage) << exponent.astype(storage))
    value = tirx.reinterpret(ACCUMULATE_DTYPE, field | tirx.const(_MAGIC_BITS, storage))

    def power_of_two(e):  # the float32 2**e, from its exponent bits
        return tirx.reinterpret(ACCUMULATE_DTYPE, ((e + 127) << 23).astype(storage))

    unscale = power_of_two(-exponent)
    offset = power_of_two(_MAGIC_EXPONENT - exponent) + tirx.const(scheme.max_int, ACCUMULATE_DTYPE)
    return value * unscale - offset


class Linear(nn.Module):
    """y = x @ weight.T (+ bias) with plain weights [out, in] in the model dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str,
                 out_dtype: str | None = None, gpu: bool = False):
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter((out_features, in_features), dtype)
        self.bias = nn.Parameter((out_features,), dtype) if bias else None
        # None: the model dtype (follows to()); the vocab projection asks for float32 logits
        self.out_dtype = out_dtype
        # the weight in a stage of its own, for gpu_schedule.py
        self.gpu = gpu

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        out_dtype = self.out_dtype or self.weight.dtype

        def compute(x_te, weight_te, *bias_te):
            return _nt_matmul(
                x_te,
                lambda j, k: weight_te[j, k].astype(ACCUMULATE_DTYPE),
                self.in_features,
                self.out_features,
                bias_te[0] if bias_te else None,
                out_dtype,
                weight_stage=self.gpu,
            )

        args = [x, self.weight] + ([self.bias] if self.bias is not None else [])
        return nn.op.tensor_expr_op(compute, "linear", args)


class GroupQuantLinear(nn.Module):
    """y = x @ dequantize(q_weight, q_scale).T (+ bias), dequantizing inside the reduction.

    q_weight [out, groups * (group // per_u32)] uint32 and q_scale [out, groups] follow
    quant.py's layout: code k of a row sits at bit (k % per_u32) * bits of word k // per_u32,
    and W[j, k] = (code - max_int) * q_scale[j, k // group], kept in float32.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme,
                 out_dtype: str | None = None, avx512_kernel: bool = False, gpu: bool = False):
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        # the hand-written x86 AVX-512 kernel (avx512_gemv.py) instead of the te.compute below
        self.avx512_kernel = avx512_kernel
        # the weight in a stage of its own, for gpu_schedule.py, unpacked without conversions
        self.gpu = gpu
        groups = scheme.num_groups(in_features)
        self.q_weight = nn.Parameter((out_features, scheme.packed_words(in_features)),
                                     scheme.storage_dtype)
        self.q_scale = nn.Parameter((out_features, groups), scheme.model_dtype)
        self.bias = nn.Parameter((out_features,), scheme.model_dtype) if bias else None
        self.out_dtype = out_dtype

    def to(self, dtype: str | None = None) -> None:
        # q_weight keeps its integer storage; only the float parameters follow the model dtype
        if dtype is not None:
            self.q_scale.to(dtype)
            if self.bias is not None:
                self.bias.to(dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        scheme = self.scheme
        model_dtype = self.q_scale.dtype
        out_dtype = self.out_dtype or model_dtype
        if self.avx512_kernel:
            return self._forward_avx512(x, out_dtype)
        storage = scheme.storage_dtype
        per_word = scheme.per_storage
        mask = tirx.const((1 << scheme.bits) - 1, storage)
        # a row's codes fill whole groups; when in_features does not (q3f16_1 at 4096: groups
        # of 40), the reduction covers the padding too, so that k // group and k % per_word
        # become loop indices after the CPU schedule splits k (otherwise a division per weight:
        # 3x slower than numpy at the vicuna-7b shape)
        padded = scheme.num_groups(self.in_features) * scheme.group_size

        def compute(x_te, q_weight_te, q_scale_te, *bias_te):
            def weight_at(j, k):
                word = q_weight_te[j, k // per_word]
                if self.gpu:
                    centred = centred_code(word, k % per_word, scheme)
                else:
                    shift = ((k % per_word) * scheme.bits).astype(storage)
                    code = (word >> shift) & mask
                    centred = (code.astype("int32") - scheme.max_int).astype(ACCUMULATE_DTYPE)
                # (code - max_int) * scale in float32, which holds it exactly: a small integer
                # times a model-dtype scale. quant.dequantize rounds it to the model dtype; that
                # rounding (relative 2**-12 in float16) is not repeated here, because two
                # conversions per weight made float16 the slowest scheme on a CPU (2x q4f32_1),
                # and the exact product is at least as close to the quantized model.
                return centred * q_scale_te[j, k // scheme.group_size].astype(ACCUMULATE_DTYPE)

            return _nt_matmul(
                x_te,
                weight_at,
                self.in_features,
                self.out_features,
                bias_te[0] if bias_te else None,
                out_dtype,
                # not on GPUs: there x must be read with plain indices (gpu_schedule pads the
                # batch with pad_einsum), and the lanes' split of k is cut short instead
                padded if padded != self.in_features and not self.gpu else None,
                weight_stage=self.gpu,
            )

        args = [x, self.q_weight, self.q_scale] + ([self.bias] if self.bias is not None else [])
        return nn.op.tensor_expr_op(compute, "dequantize_linear", args)

    def _forward_avx512(self, x: nn.Tensor, out_dtype: str) -> nn.Tensor:
        """The Linear through avx512_gemv's kernel (float32 out), then bias and cast as an
        elementwise op that fuses with what follows."""
        kernel = avx512_gemv.gemv_kernel(self.in_features, self.out_features, self.scheme,
                                         x.dtype, self.q_scale.dtype)
        y = nn.op.tensor_ir_op(
            kernel, "q4_gemv_avx512", [x, self.q_weight, self.q_scale],
            nn.Tensor.placeholder([x.shape[0], self.out_features], ACCUMULATE_DTYPE),
        )
        if self.bias is None and out_dtype == ACCUMULATE_DTYPE:
            return y
        args = [y] + ([self.bias] if self.bias is not None else [])
        return nn.op.tensor_expr_op(
            lambda y_te, *bias_te: _epilogue(y_te, bias_te[0] if bias_te else None, out_dtype),
            "bias_epilogue", args)


def make_linear(in_features: int, out_features: int, bias: bool, scheme: QuantScheme,
                out_dtype: str | None = None, cpu_target=None, gpu: bool = False) -> nn.Module:
    """cpu_target: the llvm Target compiled for, or None; the AVX-512 kernel where it applies.
    gpu: the form gpu_schedule.py schedules (a weight stage, exact unpacking without conversions)."""
    if scheme.is_quantized:
        avx512 = avx512_gemv.supported(cpu_target, scheme, in_features, out_features)
        return GroupQuantLinear(in_features, out_features, bias, scheme, out_dtype, avx512, gpu)
    return Linear(in_features, out_features, bias, scheme.model_dtype, out_dtype, gpu)


class ResBlock(nn.Module):
    """x + SiLU(Linear(x)), bias on."""

    def __init__(self, hidden_size: int, scheme: QuantScheme, cpu_target=None, gpu: bool = False):
        self.linear = make_linear(hidden_size, hidden_size, True, scheme, cpu_target=cpu_target,
                                  gpu=gpu)
        self.act = nn.SiLU()

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return x + self.act(self.linear(x))


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    """A validated tree and how the library computes its candidates."""

    tree: MedusaTree
    # ranks kept per head; the stride between heads in tree_indices
    topk: int
    # how the top-k kernels split rows of logits: topk.py's on a CPU, gpu_topk.py's on a GPU
    layout: TopkLayout | GpuTopkLayout

    @property
    def buffers(self) -> TreeBuffers:
        return build_buffers(self.tree, self.topk)


def _topk_ids(logits: nn.Tensor, k: int, layout: TopkLayout) -> nn.Tensor:
    """[batch, vocab] float32 -> [batch, k] int32: ids of the k largest, ties to the lower id."""
    batch = logits.shape[0]
    vals, ids = nn.op.tensor_ir_op(
        chunk_kernel(layout, k),
        "topk_chunks",
        [logits],
        [nn.Tensor.placeholder([batch, layout.chunks, k], "float32"),
         nn.Tensor.placeholder([batch, layout.chunks, k], "int32")],
    )  # each [batch, chunks, k]
    return nn.op.tensor_ir_op(
        merge_kernel(layout, k), "topk_merge", [vals, ids], nn.Tensor.placeholder([batch, k], "int32")
    )


def _gpu_topk_ids(rows: nn.Tensor, k: int, layout: GpuTopkLayout) -> nn.Tensor:
    """[rows, vocab] float32 -> [rows, k] int32 with gpu_topk's two kernels."""
    count = rows.shape[0]
    keys, ids = nn.op.tensor_ir_op(
        gpu_topk.chunk_kernel(layout, k),
        "topk_chunks",
        [rows],
        [nn.Tensor.placeholder([count, layout.chunks, k], "int32"),
         nn.Tensor.placeholder([count, layout.chunks, k], "int32")],
    )  # each [rows, chunks, k]
    return nn.op.tensor_ir_op(gpu_topk.merge_kernel(layout, k), "topk_merge", [keys, ids],
                              nn.Tensor.placeholder([count, k], "int32"))


def _gather_tree_rows(top: te.Tensor, tree_indices: te.Tensor, retrieve_indices: te.Tensor,
                      depth: int):
    """_gather_tree from the top-k ids of all rows at once: top [(1 + depth) * batch, topk], the
    base logits' rows first, then each head's. Candidate 0 of row b is top[b, 0] (the base
    model's best); candidate 1 + h * topk + r is top[(1 + h) * batch + b, r]."""
    topk = top.shape[1]
    batch = top.shape[0] // (1 + depth)

    def candidate(b, index):
        index = index.astype(batch.ty.dtype)
        zero = tirx.const(0, index.ty.dtype)
        head = tirx.Select(index == zero, zero, 1 + (index - 1) // topk)
        rank = tirx.Select(index == zero, zero, (index - 1) % topk)
        return top[head * batch + b, rank]

    return _gathers(batch, candidate, tree_indices, retrieve_indices)


def _gather_tree(candidates: te.Tensor, tree_indices: te.Tensor, retrieve_indices: te.Tensor):
    """generate_candidates' two gathers: candidates [batch, 1 + heads * topk] ->
    (tree_candidates [batch, L], cart_candidates [batch, leaves, depth + 1]); the -1 padding of
    retrieve_indices reads token 0."""
    return _gathers(candidates.shape[0], lambda b, index: candidates[b, index], tree_indices,
                    retrieve_indices)


def _gathers(batch, candidate, tree_indices: te.Tensor, retrieve_indices: te.Tensor):
    """tree_candidates [batch, L] (node n of row b is candidate(b, tree_indices[n])) and
    cart_candidates [batch, leaves, depth + 1] gathered from it, -1 padding reading token 0."""
    (nodes,) = tree_indices.shape
    leaves, columns = retrieve_indices.shape
    tree = te.compute((batch, nodes), lambda b, n: candidate(b, tree_indices[n]),
                      name="tree_candidates")
    cart = te.compute(
        (batch, leaves, columns),
        lambda b, r, d: tirx.Select(
            retrieve_indices[r, d] < 0,
            tirx.const(0, "int32"),
            tree[b, tirx.max(retrieve_indices[r, d], 0)],
        ),
        name="cart_candidates",
    )
    return [tree, cart]


class MedusaModel(nn.Module):
    """MLC-LLM's Medusa heads: medusa_head[h] = [ResBlock] * num_layers + [Linear(hidden, vocab)].

    nn.Module.to(dtype) also sets self.dtype, the dtype get_default_spec gives hidden_states.
    With `tree`, the module also exports get_tree_candidates and get_tree_buffers.
    cpu_target: the llvm Target of a CPU build; 4-bit Linears then use avx512_gemv's kernel where
    the target has AVX-512 and the shape fits. gpu: a GPU build; the Linears take the form
    gpu_schedule.py schedules.
    """

    def __init__(self, config: MedusaConfig, scheme: QuantScheme, tree: TreeSpec | None = None,
                 cpu_target=None, gpu: bool = False):
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        self.dtype = scheme.model_dtype
        self.tree = tree
        self.medusa_head = nn.ModuleList(
            [
                nn.ModuleList(
                    [ResBlock(config.hidden_size, scheme, cpu_target, gpu)
                     for _ in range(config.medusa_num_layers)]
                    + [make_linear(config.hidden_size, config.vocab_size, False, scheme,
                                   out_dtype=ACCUMULATE_DTYPE, cpu_target=cpu_target, gpu=gpu)]
                )
                for _ in range(config.medusa_num_heads)
            ]
        )

    def get_logits(self, hidden_states: nn.Tensor) -> list[nn.Tensor]:
        # each head ends in a Linear with float32 output: float32 logits whatever the model dtype
        return [head(hidden_states) for head in self.medusa_head]

    def get_tree_candidates(self, base_logits: nn.Tensor, hidden_states: nn.Tensor):
        """(tree_candidates [batch, L], cart_candidates [batch, leaves, depth + 1]) int32, as
        tree.generate_candidates computes them from the base logits and these heads' logits."""
        spec = self.tree
        buffers = spec.buffers
        # only the heads the tree reaches
        head_logits = [self.medusa_head[h](hidden_states) for h in range(spec.tree.depth)]
        if isinstance(spec.layout, GpuTopkLayout):
            # one top-k over the base logits' and every head's rows: two kernels, not two per head
            rows = nn.op.concat([base_logits, *head_logits], dim=0)  # [(1 + depth) * batch, vocab]
            top = _gpu_topk_ids(rows, spec.topk, spec.layout)  # [(1 + depth) * batch, topk]
            return nn.op.tensor_expr_op(
                lambda top_te, tree_te, retrieve_te: _gather_tree_rows(
                    top_te, tree_te, retrieve_te, spec.tree.depth),
                "gather_tree",
                [top, nn.Tensor.from_const(buffers.tree_indices),
                 nn.Tensor.from_const(buffers.retrieve_indices)],
            )
        root = _topk_ids(base_logits, 1, spec.layout)  # [batch, 1]
        ranks = [_topk_ids(logits, spec.topk, spec.layout) for logits in head_logits]  # [batch, topk]
        candidates = nn.op.concat([root, *ranks], dim=1)  # [batch, 1 + depth * topk]
        tree_candidates, cart_candidates = nn.op.tensor_expr_op(
            _gather_tree,
            "gather_tree",
            [candidates, nn.Tensor.from_const(buffers.tree_indices),
             nn.Tensor.from_const(buffers.retrieve_indices)],
        )
        return tree_candidates, cart_candidates

    def get_tree_buffers(self):
        """(medusa_attn_mask [L, L] float32, tree_indices [L], medusa_position_ids [L],
        retrieve_indices [leaves, depth + 1]) int32, as tree.build_buffers gives them."""
        # in TreeBuffers' field order, which runtime.get_tree_buffers names them by
        return tuple(nn.Tensor.from_const(np.ascontiguousarray(array))
                     for array in self.tree.buffers.as_dict().values())

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        spec = {
            "get_logits": {
                "hidden_states": nn.spec.Tensor(["batch_size", self.hidden_size], self.dtype),
                "$": {"param_mode": "packed", "effect_mode": "none"},
            },
        }
        if self.tree is not None:
            spec["get_tree_candidates"] = {
                "base_logits": nn.spec.Tensor(["batch_size", self.vocab_size], "float32"),
                "hidden_states": nn.spec.Tensor(["batch_size", self.hidden_size], self.dtype),
                "$": {"param_mode": "packed", "effect_mode": "none"},
            }
            spec["get_tree_buffers"] = {"$": {"param_mode": "none", "effect_mode": "none"}}
        return nn.spec.ModuleSpec.from_raw(spec, self)
