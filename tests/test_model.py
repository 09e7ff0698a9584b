"""The Relax model: parameter names, output types, and the shape of its kernels."""

from __future__ import annotations

import pytest
from tvm import ir, relax, s_tir, tirx

from tests._params import tiny_config
from medusa_cli import quantization as quant
from medusa_cli.compiler.model import MedusaModel
from medusa_cli.spec import param_specs

SCHEMES = list(quant.SCHEMES)


def _export(scheme_name: str, **config):
    model = MedusaModel(tiny_config(**config), quant.get_scheme(scheme_name))
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    return model, mod, named_params


def _blocks(func: tirx.PrimFunc):
    sch = s_tir.Schedule(func)
    return [sch.get(rv) for rv in sch.get_child_blocks(sch.get_sblock("root"))]


def _written_buffers(func: tirx.PrimFunc):
    """(block name, buffer) for every buffer a block of `func` writes."""
    for block in _blocks(func):
        for region in block.writes:
            yield block.name_hint, region.source


def _relax_ops(func: relax.Function) -> set[str]:
    names: list[str] = []

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, ir.Op):
            names.append(expr.op.name)

    relax.analysis.post_order_visit(func, visit)
    return set(names)


@pytest.mark.parametrize("scheme_name", SCHEMES)
def test_parameters_are_the_converters(scheme_name):
    config = tiny_config(medusa_num_layers=2, hidden_size=72)  # 72: not a multiple of any group
    _, _, named_params = _export(scheme_name, medusa_num_layers=2, hidden_size=72)
    found = [(name, tuple(int(d) for d in p.shape), str(p.dtype)) for name, p in named_params]
    assert found == param_specs(config, quant.get_scheme(scheme_name))


@pytest.mark.parametrize("scheme_name", SCHEMES)
def test_get_logits_returns_float32_per_head(scheme_name):
    config = tiny_config()
    _, mod, _ = _export(scheme_name)
    func = mod["get_logits"]
    assert func.params[0].ty.dtype == quant.get_scheme(scheme_name).model_dtype
    fields = func.ret_ty.fields
    assert len(fields) == config.medusa_num_heads
    for field in fields:
        assert field.dtype == "float32"
        assert isinstance(field.shape.values[0], tirx.Var)  # the dynamic batch
        assert int(field.shape.values[1]) == config.vocab_size


@pytest.mark.parametrize("scheme_name", SCHEMES)
def test_no_weight_is_transposed_or_dequantized_into_memory(scheme_name):
    """Every tensor a kernel writes is [batch, ...]: no weight-sized copy is ever computed."""
    _, mod, _ = _export(scheme_name)
    assert not _relax_ops(mod["get_logits"]) & {"relax.permute_dims", "relax.matmul"}
    kernels = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert kernels
    for func in kernels:
        for block, buffer in _written_buffers(func):
            assert isinstance(buffer.shape[0], tirx.Var), f"{block} writes {list(buffer.shape)}"


@pytest.mark.parametrize("scheme_name", ["q0f16", "q0bf16", "q4f16_1", "q3f16_1"])
def test_half_precision_accumulates_in_float32(scheme_name):
    _, mod, _ = _export(scheme_name)
    reductions = [
        buffer.dtype
        for _, func in mod.functions_items() if isinstance(func, tirx.PrimFunc)
        for block, buffer in _written_buffers(func) if block == "NT_matmul"
    ]
    assert reductions and set(reductions) == {"float32"}


@pytest.mark.parametrize("scheme_name", ["q4f16_1", "q4f32_1", "q3f16_1"])
def test_quantized_reduction_reads_the_packed_weight(scheme_name):
    """Dequantization happens inside the reduction: its block reads q_weight (uint32) itself."""
    _, mod, _ = _export(scheme_name)
    kernels = [f for gv, f in mod.functions_items() if gv.name_hint.startswith("dequantize_linear")]
    assert kernels
    for func in kernels:
        reduction = _blocks(func)[0]
        assert reduction.name_hint == "NT_matmul"
        assert "uint32" in {region.source.dtype for region in reduction.reads}


def test_to_changes_float_parameters_and_the_spec():
    model = MedusaModel(tiny_config(), quant.get_scheme("q4f32_1"))
    model.to("float16")
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    dtypes = {name.rsplit(".", 1)[1]: str(p.dtype) for name, p in named_params}
    assert dtypes == {"q_weight": "uint32", "q_scale": "float16", "bias": "float16"}
    assert mod["get_logits"].params[0].ty.dtype == "float16"

    plain = MedusaModel(tiny_config(), quant.get_scheme("q0f32"))
    plain.to("bfloat16")
    _, named_params = plain.export_tvm(spec=plain.get_default_spec())
    assert {str(p.dtype) for _, p in named_params} == {"bfloat16"}
