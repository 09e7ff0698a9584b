"""`medusa build`: convert, compile and verify in one step, for CI pipelines, with one report.

OUT_DIR receives params/ (the packed directory), medusa-<target>-<quant>.<so|tar|wasm> and
build-report.json. Everything is built in a staging directory beside OUT_DIR and renamed into
place only when the build passed (or its verification had to be skipped): a failed
verification, an error or Ctrl-C leaves OUT_DIR as it was.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from ..compiler.targets import resolve_target
from ..devices import device_visible
from ..errors import VerificationFailed
from ..library import library_file_name
from ..outputs import check_not_overlapping, check_output_dir, staged_directory
from ..packed.config import DEFAULT_CONV_TEMPLATE
from ..quantization import get_scheme
from ..spec import DEFAULT_MAX_BATCH_SIZE
from .compile import CompileRequest, compile_heads
from .convert import ConvertRequest, convert_checkpoint
from .verify import VerifyRequest, check_seed_and_batch, verify_heads

PARAMS_SUBDIR = "params"
REPORT_FILE = "build-report.json"


@dataclasses.dataclass
class BuildRequest:
    source: Path
    output: Path
    target: str = "llvm"
    # None: the source's dtype, as `medusa convert` chooses
    quantization: str | None = None
    # CUDA/ROCm arch, as for `medusa compile --arch`
    arch: str | None = None
    layout: str = "auto"
    # base-model weights file holding lm_head.weight, for heads without their own
    lm_head: Path | None = None
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    # mlc-chat-config.json's conv_template (as for `medusa convert --conv-template`)
    conv_template: str | Path = DEFAULT_CONV_TEMPLATE
    # hidden-state rows and seed of the verification
    batch: int = 4
    seed: int = 0
    force: bool = False


@dataclasses.dataclass
class BuildReport:
    output: Path
    params_dir: Path
    library: Path
    convert: dict
    compile: dict
    # VerifyReport.to_dict(); None when verification was skipped
    verify: dict | None
    # why verification was skipped; None when it ran
    skipped: str | None
    # "pass", "fail" or "skipped"
    verdict: str
    # failure_message() of a failed verification
    failure: str | None
    # whether OUT_DIR was written (not after a failed verification)
    published: bool
    warnings: list[str]
    seconds: dict[str, float]

    def raise_for_verdict(self) -> None:
        """VerificationFailed (exit code 1) when verification failed: nothing was published."""
        if self.failure:
            raise VerificationFailed(f"{self.failure}; {self.output} was not written")

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "published": self.published,
            "output": str(self.output),
            "params_dir": str(self.params_dir),
            "library": str(self.library),
            "verification_skipped": self.skipped,
            "failure": self.failure,
            "warnings": self.warnings,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "convert": self.convert,
            "compile": self.compile,
            "verify": self.verify,
        }


def _device_for(kind: str) -> tuple[str | None, str | None]:
    """(device to verify on, None) for a library of TVM target `kind`, or (None, why not)."""
    if kind == "llvm":
        return "cpu", None
    if device_visible(kind, 0):
        return f"{kind}:0", None
    return None, (
        f"no {kind} device on this machine; run `medusa verify LIB PARAMS_DIR --device {kind}:0` "
        "where one is"
    )


def _move_paths(report: dict, staging: Path, output: Path) -> dict:
    """The verify report with paths inside the staging directory pointing into OUT_DIR."""
    text = json.dumps(report)
    return json.loads(text.replace(json.dumps(str(staging))[1:-1], json.dumps(str(output))[1:-1]))


def build_heads(request: BuildRequest, stage: Callable[[str], None] | None = None) -> BuildReport:
    """Convert request.source, compile for request.target, verify where the library can run.

    stage(name) is called as each of "convert", "compile" and "verify" starts.
    """
    output = Path(request.output)
    check_output_dir(output, request.force)
    check_not_overlapping(output, [("SRC", Path(request.source)), ("--lm-head", request.lm_head)])
    check_seed_and_batch(request.seed, request.batch)
    if request.quantization is not None:
        get_scheme(request.quantization)
    # Resolved before any work so an unknown target or missing toolchain costs nothing.
    target = resolve_target(request.target, request.arch)
    seconds: dict[str, float] = {}

    with staged_directory(output, request.force) as staged:
        staging = staged.path
        if stage:
            stage("convert")
        started = time.perf_counter()
        converted = convert_checkpoint(ConvertRequest(
            source=request.source, output=staging / PARAMS_SUBDIR, quantization=request.quantization,
            layout=request.layout, lm_head=request.lm_head, max_batch_size=request.max_batch_size,
            conv_template=request.conv_template,
        ))
        seconds["convert"] = time.perf_counter() - started

        if stage:
            stage("compile")
        started = time.perf_counter()
        library_name = library_file_name(target.name, converted.quantization, target.suffix)
        compiled = compile_heads(CompileRequest(
            params_dir=staging / PARAMS_SUBDIR, target=request.target, arch=request.arch,
            output=staging / library_name,
        ))
        seconds["compile"] = time.perf_counter() - started

        device, skipped = _device_for(target.kind)
        verify = None
        verdict, failure = "skipped", None
        if device is not None:
            if stage:
                stage("verify")
            started = time.perf_counter()
            verified = verify_heads(VerifyRequest(
                library=staging / library_name, params_dir=staging / PARAMS_SUBDIR,
                source=Path(request.source), lm_head=request.lm_head, device=device,
                batch=request.batch, seed=request.seed,
            ))
            seconds["verify"] = time.perf_counter() - started
            verify = _move_paths(verified.to_dict(), staging, output)
            verdict = verified.verdict
            failure = None if verified.passed else verified.failure_message()

        report = BuildReport(
            output=output,
            params_dir=output / PARAMS_SUBDIR,
            library=output / library_name,
            convert=_move_paths(converted.to_dict(), staging, output),
            compile=_move_paths(compiled.to_dict(), staging, output),
            verify=verify,
            skipped=skipped,
            verdict=verdict,
            failure=failure,
            warnings=converted.warnings + (verify["warnings"] if verify else []),
            seconds=seconds,
            published=verdict != "fail",
        )
        if report.published:
            (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
            staged.publish()
    return report
