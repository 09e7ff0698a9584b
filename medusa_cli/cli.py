"""The `medusa` command: a thin layer over the library. Only this module prints or exits.

Humans read stderr (rich tables, progress, warnings); with --json, stdout carries exactly
one JSON object. Exit codes: 0 success, 1 verification failed, 2 usage or input error.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from . import __version__
from .errors import MedusaError

app = typer.Typer(
    name="medusa",
    help="Medusa speculative-decoding heads: from published checkpoints to compiled, verified TVM libraries.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True)

JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout (humans' output stays on stderr).")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors.")


def _version(value: bool) -> None:
    if value:
        print(f"medusa-cli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Convert, compile and verify Medusa heads. Run `medusa COMMAND --help` for examples."""


@contextlib.contextmanager
def _handle_errors(verbose: bool) -> Iterator[None]:
    """Library errors become one red line on stderr and the error's exit code."""
    try:
        yield
    except MedusaError as exc:
        if verbose:
            err.print_exception()
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: nothing was written")
        raise typer.Exit(130) from None


def _emit_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


@contextlib.contextmanager
def _byte_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar in bytes on stderr; yields update(done, total)."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def _key_value_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    return table


# ---------------------------------------------------------------------------------------------
# medusa example


@app.command(
    epilog=(
        "**Examples**\n\n"
        "    medusa example out/ckpt --preset tiny --layout medusa1\n\n"
        "    medusa example out/v7b --preset vicuna-7b --layout medusa2 --dtype float16 --shards 2"
    )
)
def example(
    output: Path = typer.Argument(..., help="Directory to write the checkpoint into."),
    layout: str = typer.Option("medusa1", help="medusa1, medusa2, trtllm, vllm or mlc."),
    preset: str = typer.Option("tiny", help="Shape preset from configs/presets.json (tiny, vicuna-7b, ...)."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
    seed: int = typer.Option(0, help="Seed: the same seed gives the same numbers in every layout."),
    file_format: Optional[str] = typer.Option(None, "--format", help="safetensors or pt (default: what the layout's project publishes)."),
    shards: int = typer.Option(1, help="Split the weights into this many files with an index."),
    bias: bool = typer.Option(True, "--bias/--no-bias", help="ResBlocks with or without bias."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUTPUT."),
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Write a seeded synthetic Medusa checkpoint in a published layout (no download needed)."""
    from .example import ExampleRequest, write_example

    with _handle_errors(verbose):
        result = write_example(ExampleRequest(
            output=output, layout=layout, preset=preset, dtype=dtype, seed=seed,
            file_format=file_format, shards=shards, bias=bias, force=force,
        ))
    if json_out:
        _emit_json(result.to_dict())
        return
    c = result.config
    err.print(
        f"[green]wrote[/] {result.output}: {result.layout} layout, preset {result.preset} "
        f"({c.medusa_num_heads} heads x {c.medusa_num_layers} layers, hidden {c.hidden_size}, "
        f"vocab {c.vocab_size}), {len(result.files)} files, {_human_bytes(result.total_bytes)}"
    )


# ---------------------------------------------------------------------------------------------
# medusa inspect


@app.command(
    epilog=(
        "**Examples**\n\n"
        "    medusa inspect ./medusa-vicuna-7b-v1.3\n\n"
        "    medusa inspect out/params --json | jq .num_heads"
    )
)
def inspect(
    path: Path = typer.Argument(..., help="A checkpoint (file or directory), a packed directory or a compiled library."),
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Show the layout, heads, shapes, dtype and size of a checkpoint, packed directory or library."""
    from .inspection import inspect_path

    with _handle_errors(verbose):
        report = inspect_path(path)
    if json_out:
        _emit_json(report.to_dict())
        return
    rows = [
        ("kind", report.kind),
        ("layout", report.layout or "-"),
        ("quantization", report.quantization or "-"),
        ("heads", report.num_heads),
        ("layers per head", report.num_layers),
        ("hidden size", report.hidden_size),
        ("vocab size", report.vocab_size),
        ("dtype", report.dtype),
        ("parameters", f"{report.param_count:,}"),
        ("bytes", f"{report.param_bytes:,} ({_human_bytes(report.param_bytes)})"),
    ]
    if report.ignored_tensors:
        rows.append(("ignored tensors", f"{report.ignored_tensors} (base model)"))
    rows += [(k.replace("_", " "), v) for k, v in report.extra.items()]
    rows.append(("files", "\n".join(report.files) or "-"))
    err.print(_key_value_table(str(report.path), rows))
    for warning in report.warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)


# ---------------------------------------------------------------------------------------------
# medusa convert


@app.command(
    epilog=(
        "**Examples**\n\n"
        "    medusa convert ./medusa-vicuna-7b-v1.3 -o out/params --dtype float16\n\n"
        "    medusa convert model.safetensors.index.json -o out/params --quantization q4f16_1\n\n"
        "    medusa convert ./heads -o out/params --lm-head base/model-00002-of-00002.safetensors"
    )
)
def convert(
    source: Path = typer.Argument(..., help="Checkpoint directory, weights file (.safetensors/.pt/.bin) or shard index."),
    output: Path = typer.Option(..., "--output", "-o", help="Packed parameter directory to write."),
    dtype: Optional[str] = typer.Option(None, help="float16, bfloat16 or float32 (default: the source's)."),
    quantization: Optional[str] = typer.Option(None, "--quantization", "-q", help="q0f32, q0f16, q0bf16, q4f16_1, q4f32_1 or q3f16_1."),
    layout: str = typer.Option("auto", help="auto, medusa1, medusa2, trtllm, vllm or mlc."),
    num_heads: Optional[int] = typer.Option(None, help="Keep only the first N heads."),
    lm_head: Optional[Path] = typer.Option(None, help="Base-model weights file holding lm_head.weight, for heads without their own."),
    max_batch_size: int = typer.Option(1, help="Recorded in the config (MLC-LLM's max_batch_size)."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Accept NaN/Inf in the weights."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUTPUT directory."),
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Convert a Medusa checkpoint (any published layout) into a packed parameter directory."""
    from .convert import ConvertRequest, convert_checkpoint

    request = ConvertRequest(
        source=source, output=output, dtype=dtype, quantization=quantization, layout=layout,
        num_heads=num_heads, lm_head=lm_head, force=force, allow_nonfinite=allow_nonfinite,
        max_batch_size=max_batch_size,
    )
    with _handle_errors(verbose), _byte_progress("converting") as update:
        result = convert_checkpoint(request, progress=update)
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if json_out:
        _emit_json(result.to_dict())
        return
    c = result.config
    err.print(
        f"[green]converted[/] {source} ({result.layout}, {result.source_dtype}) -> {result.output}: "
        f"{c.medusa_num_heads} heads x {c.medusa_num_layers} layers, hidden {c.hidden_size}, "
        f"vocab {c.vocab_size}, {result.quantization}, {result.num_tensors} tensors in "
        f"{result.num_shards} shards, {_human_bytes(result.param_bytes)} in {result.seconds:.1f} s",
        highlight=False,
    )


# ---------------------------------------------------------------------------------------------
# medusa tree


@app.command(
    epilog=(
        "**Examples**\n\n"
        "    medusa tree mc_sim_7b_63 -o buffers.npz\n\n"
        "    medusa tree my_tree.json --topk 8 --json"
    )
)
def tree(
    choices: str = typer.Argument(..., help="A shipped tree (mc_sim_7b_63, vicuna_7b_stage2, ...) or a JSON file of paths."),
    topk: int = typer.Option(10, help="Candidates per head (each path index must be below this)."),
    num_heads: Optional[int] = typer.Option(None, help="Refuse trees deeper than this many heads."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the buffers to this .npz file."),
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Build the Medusa tree buffers (attention mask, tree/retrieve indices, position ids)."""
    from .tree import build_buffers, describe, load_tree

    with _handle_errors(verbose):
        medusa_tree = load_tree(choices, topk=topk, num_heads=num_heads)
        buffers = build_buffers(medusa_tree, topk)
        written = buffers.to_npz(output) if output is not None else None
        summary = describe(medusa_tree, topk)
    if written is not None:
        summary["output"] = str(written)
    if json_out:
        _emit_json(summary)
        return
    rows = [
        ("nodes (with root)", summary["nodes"]),
        ("depth", summary["depth"]),
        ("nodes per depth", ", ".join(map(str, summary["nodes_per_depth"]))),
        ("leaves", summary["leaves"]),
        ("tree candidates", "x".join(map(str, summary["candidates"]["tree"]))),
        ("cartesian candidates", "x".join(map(str, summary["candidates"]["cartesian"]))),
        ("top-k", topk),
    ]
    if written is not None:
        rows.append(("buffers", str(written)))
    err.print(_key_value_table(f"tree {summary['name']}", rows))


if __name__ == "__main__":  # pragma: no cover
    app()
