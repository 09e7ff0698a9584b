"""verify_heads against the numpy oracle: correct libraries pass in every layout and scheme,
damaged ones fail and name the head or the file."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medusa_cli import quantization as quant
from medusa_cli.checkpoint.files import Checkpoint
from medusa_cli.commands.compile import CompileRequest, compile_heads
from medusa_cli.commands.convert import ConvertRequest, convert_checkpoint
from medusa_cli.errors import InputError, ParamsError, VerificationFailed
from medusa_cli.checkpoint.safetensors import write_safetensors
from medusa_cli.checkpoint.synthetic import iter_example_reference, preset_config
from medusa_cli.commands.example import ExampleRequest, write_example
from medusa_cli.verify.oracle import HeadWeights, random_hidden, reference_logits
from medusa_cli.runtime.heads import load_heads
from medusa_cli.commands.verify import VerifyRequest, verify_heads
from medusa_cli.verify.judge import judge
from medusa_cli.verify.thresholds import Bounds, Thresholds, load_thresholds
from tests._verify_helpers import (
    Workshop,
    flip_byte,
    lm_head_name,
    perturb_element,
    swap_heads,
)

# Each scheme from another layout and source dtype, so every layout is covered once.
CASES = [
    ("q0f32", "medusa1", "float32"),
    ("q0f16", "medusa2", "float16"),
    ("q0bf16", "trtllm", "bfloat16"),
    ("q4f16_1", "vllm", "float32"),
    ("q4f32_1", "mlc", "float32"),
    ("q3f16_1", "medusa1", "float16"),
]


@pytest.fixture(scope="session")
def workshop(tmp_path_factory) -> Workshop:
    return Workshop(tmp_path_factory.mktemp("verify"))


def _verify(built, **options):
    return verify_heads(VerifyRequest(library=built.library, params_dir=built.params, **options))


@pytest.mark.parametrize("scheme,layout,dtype", CASES)
def test_correct_library_passes_with_margin(workshop, scheme, layout, dtype):
    built = workshop.build(scheme, layout=layout, dtype=dtype)
    report = _verify(built)
    assert report.verdict == "pass", report.failure_message()
    assert report.source.kind == "checkpoint" and report.source.path == built.ckpt
    assert report.source.layout == layout and report.warnings == []
    assert report.integrity.ok and report.integrity.shards == 1
    thresholds = load_thresholds(scheme)
    assert len(report.heads) == 3
    for head in report.heads:
        # a factor of 5 below every bound: a correct library is not near the edge
        assert head.vs_reference.metrics.max_rel_err * 5 < thresholds.reference.rtol
        assert head.vs_source.metrics.max_rel_err * 2 < thresholds.source.rtol
        assert 1 - head.vs_source.metrics.cosine < (1 - thresholds.source.min_cosine) / 2
        assert head.vs_reference.top1 == 1.0


def test_metrics_match_an_independent_computation(workshop):
    """q0f32 from a float32 example: the reference is the example's weights, so the reported
    errors must equal |compiled - numpy| computed here from the example generator."""
    built = workshop.build("q0f32")
    config, _ = preset_config("tiny")
    report = _verify(built, batch=3, seed=7)

    tensors = dict(iter_example_reference(config, "float32", seed=0))
    heads = [
        HeadWeights(
            layers=[(tensors[f"medusa_head.{h}.0.linear.weight"], tensors[f"medusa_head.{h}.0.linear.bias"])],
            lm_head=tensors[lm_head_name(h)],
        )
        for h in range(3)
    ]
    hidden = random_hidden(3, config.hidden_size, seed=7).astype(np.float32)
    expected = reference_logits(heads, hidden)
    compiled = load_heads(built.library, built.params).get_logits(hidden)
    for head, got, want in zip(report.heads, compiled, expected):
        max_abs = float(np.abs(got - want).max())
        assert head.vs_reference.metrics.max_abs_err == pytest.approx(max_abs, rel=1e-9)
        assert head.vs_reference.peak == pytest.approx(float(np.abs(want).max()), rel=1e-12)
        assert head.vs_source.metrics.max_abs_err == pytest.approx(max_abs, rel=1e-9)


def test_quantization_error_is_separated_from_compile_error(workshop):
    report = _verify(workshop.build("q4f16_1"))
    for head in report.heads:
        # the source comparison carries the int4 error, the reference comparison only fp16 rounding
        assert head.vs_source.metrics.max_rel_err > 20 * head.vs_reference.metrics.max_rel_err
        assert head.vs_source.metrics.max_rel_err > 1e-2


# ---------------------------------------------------------------------------------------------
# Sabotage: a wrong library or directory must fail and name what is wrong


def test_swapped_heads_fail_and_are_named(workshop):
    broken = workshop.copy(workshop.build("q0f32"))
    swap_heads(broken.params, 0, 1)
    report = _verify(broken)
    assert report.integrity.ok  # the bytes are intact; only the numbers can tell
    assert report.verdict == "fail" and report.failed_heads == [0, 1]
    assert all(h.vs_reference.metrics.max_rel_err > 0.5 for h in report.heads[:2])
    message = report.failure_message()
    assert "head 0:" in message and "head 1:" in message and "head 2" not in message
    with pytest.raises(VerificationFailed, match="head 0") as info:
        report.raise_for_verdict()
    assert info.value.exit_code == 1


@pytest.mark.parametrize(
    "scheme,tensor,delta,factor",
    [
        ("q0f32", "weight", 0.5, 1000),
        ("q0f32", "weight", 0.01, 100),  # half the weights' std
        ("q0f16", "weight", 0.5, 100),
        ("q0bf16", "weight", 0.5, 20),
        ("q4f16_1", "q_weight", 1, 2),  # one int4 code one step up
        ("q4f32_1", "q_weight", 1, 20),
    ],
)
def test_one_perturbed_weight_fails_its_head(workshop, scheme, tensor, delta, factor):
    broken = workshop.copy(workshop.build(scheme))
    old, new = perturb_element(broken.params, f"medusa_head.2.1.{tensor}", (17, 5), delta)
    assert new != old
    report = _verify(broken)
    assert report.integrity.ok and report.failed_heads == [2]
    failing = report.heads[2].vs_reference
    # out of bounds by `factor` or more, while the cosine may barely notice a single element
    assert failing.metrics.max_rel_err > factor * load_thresholds(scheme).reference.rtol
    assert "max error vs reference" in failing.reasons[0]
    assert "head 2:" in report.failure_message()


def test_params_from_another_checkpoint_fail_every_head(workshop):
    built = workshop.build("q4f16_1")
    other = workshop.build("q4f16_1", seed=1)
    # the library is the seed-0 one; the parameters come from seed 1; the source is seed 0
    report = verify_heads(VerifyRequest(library=built.library, params_dir=other.params, source=built.ckpt))
    assert report.source.origin == "--source"
    assert report.failed_heads == [0, 1, 2]
    for head in report.heads:
        assert head.vs_reference.metrics.cosine < 0.5 and head.vs_source.metrics.cosine < 0.5


def test_corrupted_shard_fails_naming_the_file(workshop):
    broken = workshop.copy(workshop.build("q0f32"))
    flip_byte(broken.params / "params_shard_0.bin")
    report = _verify(broken)
    assert not report.integrity.ok and report.heads == [] and report.source is None
    assert report.verdict == "fail"
    assert "params_shard_0.bin" in report.integrity.error and "md5" in report.integrity.error
    with pytest.raises(VerificationFailed, match="params_shard_0.bin"):
        report.raise_for_verdict()
    assert json.loads(json.dumps(report.to_dict()))["integrity"]["ok"] is False


def test_truncated_shard_fails_naming_the_file(workshop):
    broken = workshop.copy(workshop.build("q0f32"))
    shard = broken.params / "params_shard_0.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    report = _verify(broken)
    assert report.verdict == "fail" and "params_shard_0.bin" in report.integrity.error
    assert "bytes" in report.integrity.error


def test_params_of_another_scheme_do_not_match_the_library(workshop):
    library = workshop.build("q0f32").library
    params = workshop.build("q0f16").params
    report = verify_heads(VerifyRequest(library=library, params_dir=params))
    assert report.verdict == "fail"
    assert "medusa_head.0.0.linear.weight" in report.integrity.error
    assert "float16" in report.integrity.error and "float32" in report.integrity.error


# ---------------------------------------------------------------------------------------------
# Sources


def _private_source(tmp_path: Path, seed: int = 0) -> Path:
    return write_example(ExampleRequest(output=tmp_path / f"src{seed}", seed=seed,
                                        file_format="safetensors")).output


def test_missing_source_falls_back_to_the_packed_weights(workshop, tmp_path):
    src = _private_source(tmp_path)
    params = tmp_path / "params"
    convert_checkpoint(ConvertRequest(source=src, output=params, quantization="q4f16_1"))
    library = workshop.build("q4f16_1").library  # same shapes and scheme
    shutil.rmtree(src)
    report = verify_heads(VerifyRequest(library=library, params_dir=params))
    assert report.verdict == "pass"
    assert report.source.kind == "packed" and report.source.path == params
    assert any("no longer exists" in w and str(src) in w and "--source" in w for w in report.warnings)
    assert all(h.vs_source is None for h in report.heads)
    assert report.heads[0].vs_reference.metrics.max_rel_err < 1e-3


def test_packed_fallback_still_catches_a_perturbed_weight(workshop, tmp_path):
    src = _private_source(tmp_path)
    params = tmp_path / "params"
    convert_checkpoint(ConvertRequest(source=src, output=params, quantization="q0f32"))
    shutil.rmtree(src)
    # a bad kernel reading the wrong element would show; here the packed weight is what the
    # library reads, so a perturbation in the file is invisible without the source...
    perturb_element(params, lm_head_name(1), (3, 3), 0.5)
    library = workshop.build("q0f32").library
    assert verify_heads(VerifyRequest(library=library, params_dir=params)).verdict == "pass"
    # ...and caught as soon as the original checkpoint is given
    report = verify_heads(VerifyRequest(library=library, params_dir=params, source=workshop.checkpoint()))
    assert report.failed_heads == [1]


def test_changed_source_is_a_warning_and_fails(workshop, tmp_path):
    src = _private_source(tmp_path)
    params = tmp_path / "params"
    convert_checkpoint(ConvertRequest(source=src, output=params, quantization="q0f32"))
    other = _private_source(tmp_path, seed=1)
    shutil.copy(other / "medusa_lm_head.safetensors", src / "medusa_lm_head.safetensors")
    report = verify_heads(VerifyRequest(library=workshop.build("q0f32").library, params_dir=params))
    assert any("changed since `medusa convert`" in w and "medusa_lm_head.safetensors" in w
               for w in report.warnings)
    assert report.failed_heads == [0, 1, 2]


def test_source_with_other_shapes_is_an_input_error(workshop, tmp_path):
    built = workshop.build("q0f32")
    with Checkpoint(built.ckpt) as ckpt:
        # the same heads with half the vocabulary
        specs = [(name, array.shape, "float32", lambda array=array: array)
                 for name, array in ((n, ckpt.read(n)) for n in ckpt.names())]
    specs = [(n, (128, 64), d, lambda make=make: make()[:128]) if shape == (256, 64) else (n, shape, d, make)
             for n, shape, d, make in specs]
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    write_safetensors(wrong / "model.safetensors", specs)
    with pytest.raises(InputError, match=r"--source .*vocab 128; the library has .*vocab 256"):
        verify_heads(VerifyRequest(library=built.library, params_dir=built.params, source=wrong))


def test_fewer_heads_converted_than_the_source_holds(workshop, tmp_path):
    src = workshop.checkpoint()
    params = tmp_path / "params"
    convert_checkpoint(ConvertRequest(source=src, output=params, quantization="q0f32", num_heads=2))
    library = compile_heads(CompileRequest(params, output=params / "heads.so")).output
    report = verify_heads(VerifyRequest(library=library, params_dir=params))
    assert report.verdict == "pass" and len(report.heads) == 2


def test_heads_without_their_own_lm_head(workshop, tmp_path):
    src = write_example(ExampleRequest(output=tmp_path / "ck", head_lm_head=False)).output
    params = tmp_path / "params"
    convert_checkpoint(ConvertRequest(source=src, output=params, quantization="q0f32",
                                      lm_head=src / "base" / "lm_head.safetensors"))
    library = workshop.build("q0f32").library
    # the lm_head file is found among the recorded source files
    assert verify_heads(VerifyRequest(library=library, params_dir=params)).verdict == "pass"
    # with --source it must be given, as to `medusa convert`
    report = verify_heads(VerifyRequest(library=library, params_dir=params, source=src,
                                        lm_head=src / "base" / "lm_head.safetensors"))
    assert report.verdict == "pass"
    with pytest.raises(InputError, match="--lm-head"):
        verify_heads(VerifyRequest(library=library, params_dir=params, source=src))


# ---------------------------------------------------------------------------------------------
# Hidden states


def test_user_inputs_larger_than_the_max_batch(workshop, tmp_path):
    built = workshop.build("q0f16")
    path = tmp_path / "hidden.npy"
    np.save(path, np.random.default_rng(3).standard_normal((11, 64)))  # float64, 11 > 8
    report = _verify(built, inputs=path)
    assert report.verdict == "pass"
    assert report.inputs == {"kind": "file", "path": str(path), "batch": 11}


@pytest.mark.parametrize(
    "array,words",
    [
        (np.zeros((4, 65), np.float32), r"shape \[4, 65\], expected \[batch, 64\]"),
        (np.zeros((64,), np.float32), r"shape \[64\], expected \[batch, 64\]"),
        (np.zeros((4, 64), np.int64), "dtype int64"),
        (np.full((2, 64), np.nan, np.float32), "row 0 holds NaN or Inf"),
        (np.full((2, 64), 1e6), "row 0 holds NaN or Inf once rounded to the library's float16"),
    ],
)
def test_bad_inputs_name_the_file_and_what_is_expected(workshop, tmp_path, array, words):
    path = tmp_path / "hidden.npy"
    np.save(path, array)
    with pytest.raises(InputError, match=words) as info:
        _verify(workshop.build("q0f16"), inputs=path)
    assert str(path) in str(info.value) and info.value.exit_code == 2


def test_inputs_that_are_not_an_npy(workshop, tmp_path):
    npz = tmp_path / "hidden.npz"
    np.savez(npz, x=np.zeros((2, 64)))
    with pytest.raises(InputError, match="npz archive"):
        _verify(workshop.build("q0f32"), inputs=npz)
    text = tmp_path / "hidden.npy"
    text.write_text("not numpy")
    with pytest.raises(InputError, match="not a .npy array"):
        _verify(workshop.build("q0f32"), inputs=text)
    with pytest.raises(InputError, match="no such file"):
        _verify(workshop.build("q0f32"), inputs=tmp_path / "absent.npy")


def test_usage_errors(workshop, tmp_path):
    built = workshop.build("q0f32")
    with pytest.raises(InputError, match="--batch 0"):
        _verify(built, batch=0)
    with pytest.raises(InputError, match="--topk 0"):
        _verify(built, topk=0)
    with pytest.raises(InputError, match="--source .*no such file"):
        _verify(built, source=tmp_path / "nowhere")
    with pytest.raises(ParamsError, match="not a directory"):
        verify_heads(VerifyRequest(library=built.library, params_dir=tmp_path / "nowhere"))
    with pytest.raises(InputError, match="no such library"):
        verify_heads(VerifyRequest(library=tmp_path / "x.so", params_dir=built.params))
    with pytest.raises(InputError, match="--device cuda:0"):
        _verify(built, device="cuda:0")


# ---------------------------------------------------------------------------------------------
# Thresholds and judging


def test_every_scheme_has_thresholds_and_flags_override_them():
    for name in quant.SCHEMES:
        thresholds = load_thresholds(name)
        assert thresholds.reference.rtol < thresholds.source.rtol or name in ("q0f32", "q0f16")
        assert thresholds.reference.min_top1 == 1.0
    tightened = load_thresholds("q4f16_1", {"rtol": 1e-6, "source_min_cosine": 0.5, "atol": None})
    assert tightened.reference.rtol == 1e-6 and tightened.source.min_cosine == 0.5
    assert tightened.reference.atol == 0.0
    with pytest.raises(InputError, match="--min-top1 1.5: must be between 0 and 1"):
        load_thresholds("q0f32", {"min_top1": 1.5})
    with pytest.raises(InputError, match="--rtol -1"):
        load_thresholds("q0f32", {"rtol": -1.0})


def test_threshold_flags_reach_the_verdict(workshop):
    built = workshop.build("q0f16")
    assert _verify(built, rtol=1e-7).failed_heads == [0, 1, 2]
    report = _verify(built, atol=1.0, rtol=0.0)
    assert report.verdict == "pass" and report.thresholds.reference.atol == 1.0


def _bounds(**overrides) -> Bounds:
    return dataclasses.replace(Bounds(rtol=1e-3, min_cosine=0.99, min_top1=1.0), **overrides)


def test_judge_forgives_near_ties_only():
    expected = np.array([[1.0, 0.9995, -1.0, 0.0]])
    flipped = np.array([[0.9995, 1.0, -1.0, 0.0]])
    near = judge(flipped, expected, _bounds(), slack=2e-3, k=2, label="reference")
    assert near.metrics.top1_agreement == 0.0 and near.near_ties == 1 and near.top1 == 1.0
    assert near.passed
    far = np.array([[0.0, 0.9995, -1.0, 1.0]])
    result = judge(far, expected, _bounds(rtol=10.0), slack=2e-3, k=2, label="reference")
    assert result.top1 == 0.0 and not result.passed
    assert any("top-1 agreement vs reference 0 < 1" in r for r in result.reasons)


def test_judge_fails_non_finite_logits_and_reports_them_as_json_null():
    expected = np.array([[1.0, 2.0, 3.0]])
    actual = np.array([[1.0, np.nan, 3.0]])
    result = judge(actual, expected, _bounds(rtol=1e9, min_cosine=-1.0, min_top1=0.0), slack=0.0,
                   k=1, label="reference")
    assert not result.passed and "NaN or Inf in 1 of 1 rows" in result.reasons[0]
    assert "max error" in result.reasons[1]
    data = result.to_dict()
    assert data["max_abs_err"] is None
    json.dumps(data, allow_nan=False)


def test_report_to_dict_is_strict_json(workshop):
    report = _verify(workshop.build("q3f16_1"))
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["verdict"] == "pass" and data["failed_heads"] == []
    assert data["library"]["quantization"] == "q3f16_1"
    assert data["thresholds"]["source"]["min_cosine"] == load_thresholds("q3f16_1").source.min_cosine
    assert set(data["heads"][0]) == {"head", "passed", "reasons", "vs_reference", "vs_source"}
    assert data["inputs"]["kind"] == "random" and data["device"] == "cpu"


def test_thresholds_to_dict_round_trips():
    thresholds = load_thresholds("q4f32_1")
    data = thresholds.to_dict()
    rebuilt = Thresholds(data["scheme"], Bounds(**data["reference"]), Bounds(**data["source"]))
    assert rebuilt == thresholds
