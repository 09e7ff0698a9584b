"""The `medusa` command: a thin layer over the library. Only this module prints or exits.

Each command parses its flags into a request, makes one call into medusa_cli.commands and renders
the result. Humans read stderr (rich tables, progress, warnings); with --json, stdout carries
exactly one JSON object. Exit codes: 0 success, 1 verification failed, 2 usage or input error,
130 interrupted (Ctrl-C), 128 + N for termination by signal N (SIGTERM 143, SIGHUP 129): every
interruption removes partial outputs first.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from ._version import __version__
from .errors import InputError, MedusaError
from .batch import DEFAULT_MAX_BATCH_SIZE

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


# Control characters a message may carry from a file (a tensor name holding a newline or a
# terminal escape), shown escaped: a message stays one line and cannot drive the terminal.
_CONTROL_CHARACTERS = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)]}
_CONTROL_CHARACTERS.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def _say(label: str, style: str, text: str) -> None:
    """One message on stderr, whole: soft_wrap leaves wrapping to the terminal, so rich never
    folds or crops a long path (a word wider than the console) and no word is lost. Escaped:
    messages show shapes such as [batch, 64], which rich would take for markup."""
    text = text.translate(_CONTROL_CHARACTERS)
    err.print(f"[{style}]{label}:[/] {escape(text)}", highlight=False, soft_wrap=True)


def _warn(text: str) -> None:
    _say("warning", "yellow", text)


class _Terminated(KeyboardInterrupt):
    """A termination signal, raised where the main thread is so every `finally` (staging
    directories, partial files) runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    for other in _SIGNALS:  # a second signal must not cut the cleanup short
        signal.signal(other, signal.SIG_IGN)
    raise _Terminated(signum)


_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def _handle_errors(verbose: bool) -> Iterator[None]:
    """Library errors become one red line on stderr and the error's exit code; SIGTERM and
    SIGHUP clean up like Ctrl-C."""
    previous = {}
    for signum in _SIGNALS:
        with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
            previous[signum] = signal.signal(signum, _raise_terminated)
    try:
        yield
    except MedusaError as exc:
        if verbose:
            err.print_exception()
        _say("error", "bold red", str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, _Terminated) else signal.SIGINT
        _say("interrupted", "bold red", f"{signal.Signals(signum).name}; nothing was written")
        raise typer.Exit(128 + signum) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
def _progress(description: str, *columns) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr with `columns` between the bar and the time left, where
    stderr is a terminal (a CI log gets no bar and no blank lines); yields update(done, total)."""
    if not err.is_terminal:
        yield lambda done, total: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), *columns, TimeRemainingColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def _byte_progress(description: str):
    """Progress in bytes, with the transfer speed."""
    return _progress(description, DownloadColumn(), TransferSpeedColumn())


def _count_progress(description: str, unit: str):
    """Progress counting `unit`s."""
    # MofNCompleteColumn shows "?" while the total is unknown (a format string would fail on None)
    return _progress(description, MofNCompleteColumn(), TextColumn(unit))


class _NoStatus:
    def update(self, text: str) -> None:
        pass


@contextlib.contextmanager
def _status(text: str) -> Iterator:
    """A spinner with `text` on stderr where it is a terminal; yields an object whose
    update(text) changes it."""
    if not err.is_terminal:
        yield _NoStatus()
        return
    with err.status(text, spinner="dots") as status:
        yield status


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
        "    medusa example out/v7b --preset vicuna-7b --layout medusa2 --dtype float16 --shards 2\n\n"
        "    medusa example out/evalckpt --preset eval-tiny --eval-set out/eval.npz"
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
    eval_set: Optional[Path] = typer.Option(None, "--eval-set", help="Also write an evaluation set (.npz of hidden, tokens, sequence) whose head accuracies are known by construction, for `medusa eval`; the heads are built for it (--preset eval-tiny)."),
    eval_positions: int = typer.Option(1024, help="Positions in the --eval-set, in sequences of 64."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUTPUT."),
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Write a seeded synthetic Medusa checkpoint in a published layout (no download needed)."""
    from .commands.example import ExampleRequest, write_example

    with _handle_errors(verbose):
        result = write_example(ExampleRequest(
            output=output, layout=layout, preset=preset, dtype=dtype, seed=seed,
            file_format=file_format, shards=shards, bias=bias, force=force,
            eval_set=eval_set, eval_positions=eval_positions,
        ))
    if json_out:
        _emit_json(result.to_dict())
        return
    c = result.config
    err.print(
        f"[green]wrote[/] {result.output}: {result.layout} layout, preset {result.preset} "
        f"({c.medusa_num_heads} heads x {c.medusa_num_layers} layers, hidden {c.hidden_size}, "
        f"vocab {c.vocab_size}), {len(result.files)} files, {_human_bytes(result.total_bytes)}", soft_wrap=True)
    if result.eval_set is not None:
        top1 = ", ".join(f"{row[0]:.2f}" for row in result.designed_accuracy)
        err.print(f"[green]wrote[/] {escape(str(result.eval_set))}: {result.eval_positions} "
                  f"positions; designed top-1 accuracy per head {top1}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# medusa inspect


@app.command(
    epilog=(
        "**Examples**\n\n"
        "    medusa inspect ./medusa-vicuna-7b-v1.3\n\n"
        "    medusa inspect out/params --json | jq .num_heads\n\n"
        "    medusa inspect heads.so --kernels --gpu h200"
    )
)
def inspect(
    path: Path = typer.Argument(..., help="A checkpoint (file or directory), a packed directory or a compiled library."),
    load: bool = typer.Option(False, "--load", help="Load a library that holds no medusa-cli metadata (built by MLC-LLM, say) to ask its _metadata function; loading runs its code, so only for libraries you trust."),
    kernels: bool = typer.Option(False, "--kernels", help="A library's kernel report: each device kernel's schedule, threads, blocks at batch 1 and the max batch, registers and spills (CUDA, from ptxas) and the parameter bytes it reads; and the roofline."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="The GPU of the roofline (bytes per call / its published bandwidth): h200, h100, h100-pcie, a100, a100-40gb, l40s, a10, l4, rtx4090, rtx3090, mi300x (default h100)."),
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Show the layout, heads, shapes, dtype and size of a checkpoint, packed directory or library."""
    from .commands.inspect import inspect_path

    with _handle_errors(verbose):
        report = inspect_path(path, load=load, kernels=kernels, gpu=gpu)
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
    if report.kernels is not None:
        err.print(_kernel_table(report.kernels))
    if report.roofline is not None:
        r = report.roofline
        err.print(f"roofline: {_human_bytes(r['bytes_per_call'])} of parameters per get_logits "
                  f"call; at the {r['gpu']}'s {r['bandwidth_gbps'] / 1000:g} TB/s, "
                  f"{r['predicted_ms']:.3g} ms", highlight=False, soft_wrap=True)
    for warning in report.warnings:
        _warn(warning)


def _kernel_table(kernels: list[dict]) -> Table:
    table = Table(title="kernels", title_justify="left")
    batches = sorted({b for k in kernels for b in k["blocks"]}, key=int)
    for column in ("kernel", "schedule", "threads", *(f"blocks @{b}" for b in batches),
                   "regs", "spills", "weights"):
        table.add_column(column, justify="left" if column in ("kernel", "schedule") else "right",
                         overflow="fold")
    for k in kernels:
        # the schedule's name; its parameters are in --json
        table.add_row(k["name"], k["schedule"].split(":")[0], str(k["threads_per_block"]),
                      *(str(k["blocks"].get(b, "-")) for b in batches),
                      "-" if k["registers"] is None else str(k["registers"]),
                      "-" if k["spill_bytes"] is None else f"{k['spill_bytes']} B",
                      _human_bytes(k["weight_bytes"]) if k["weight_bytes"] else "-")
    if not kernels:
        table.caption = "no device kernels (a CPU library)"
    return table


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
    max_batch_size: int = typer.Option(DEFAULT_MAX_BATCH_SIZE, help="Largest batch the compiled library accepts: mlc-chat-config.json's max_batch_size, which `medusa compile` builds for and MLC-LLM's engine caps its batch at."),
    conv_template: str = typer.Option("vicuna_v1.1", help="mlc-chat-config.json's conv_template, which MLC-LLM's engine requires: vicuna_v1.1 (the base model of the published Medusa heads), llama-2, llama-3, mistral_default, gemma_instruction, chatml, LM, or a JSON file holding MLC-LLM's Conversation object."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Accept NaN/Inf in the weights."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUTPUT directory."),
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Convert a Medusa checkpoint (any published layout) into a packed parameter directory."""
    from .commands.convert import ConvertRequest, convert_checkpoint

    request = ConvertRequest(
        source=source, output=output, dtype=dtype, quantization=quantization, layout=layout,
        num_heads=num_heads, lm_head=lm_head, force=force, allow_nonfinite=allow_nonfinite,
        max_batch_size=max_batch_size, conv_template=conv_template,
    )
    with _handle_errors(verbose), _byte_progress("converting") as update:
        result = convert_checkpoint(request, progress=update)
    for warning in result.warnings:
        _warn(warning)
    if json_out:
        _emit_json(result.to_dict())
        return
    c = result.config
    err.print(
        f"[green]converted[/] {source} ({result.layout}, {result.source_dtype}) -> {result.output}: "
        f"{c.medusa_num_heads} heads x {c.medusa_num_layers} layers, hidden {c.hidden_size}, "
        f"vocab {c.vocab_size}, {result.quantization}, {result.num_tensors} tensors in "
        f"{result.num_shards} shards, {_human_bytes(result.param_bytes)} in {result.seconds:.1f} s",
        highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# medusa tree


@app.command(
    epilog=(
        "With --accuracy (`medusa eval`'s JSON or FasterDecoding's heads_accuracy.pt), also the "
        "expected acceptance length: 1 + the sum over paths of the product of per-rank "
        "accuracies along the path, the tokens a step accepts on average.\n\n"
        "**Examples**\n\n"
        "    medusa tree mc_sim_7b_63 -o buffers.npz\n\n"
        "    medusa tree mc_sim_7b_63 --accuracy accuracy.json --plot tree.svg\n\n"
        "    medusa tree tree.json --ranks held-out.ranks.npy --json\n\n"
        "    medusa tree my_tree.json --topk 8 --json"
    )
)
def tree(
    choices: str = typer.Argument(..., help="A shipped tree (mc_sim_7b_63, vicuna_7b_stage2, ...) or a JSON file of paths."),
    topk: int = typer.Option(10, help="Candidates per head (each path index must be below this)."),
    num_heads: Optional[int] = typer.Option(None, help="Refuse trees deeper than this many heads."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the buffers to this .npz file."),
    accuracy: Optional[Path] = typer.Option(None, help="Per-rank accuracy of each head (`medusa eval -o` JSON or heads_accuracy.pt): report the expected acceptance length."),
    plot: Optional[Path] = typer.Option(None, help="Draw the tree to this .svg (each node's rank and, with --accuracy, the chance it is accepted)."),
    ranks: Optional[Path] = typer.Option(None, help="The NAME.ranks.npy `medusa eval -o` wrote: report the acceptance measured on that data."),
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Build the Medusa tree buffers (attention mask, tree/retrieve indices, position ids)."""
    from .commands.tree import TreeRequest, describe_tree

    with _handle_errors(verbose):
        result = describe_tree(TreeRequest(choices=choices, topk=topk, num_heads=num_heads,
                                           output=output, accuracy=accuracy, plot=plot,
                                           ranks=ranks))
    summary = result.to_dict()
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
    if result.expected_acceptance_length is not None:
        rows.append(("expected acceptance length", f"{result.expected_acceptance_length:.4f}"))
    if result.measured_acceptance_length is not None:
        rows.append(("measured acceptance length",
                     f"{result.measured_acceptance_length:.4f} ({result.positions:,} positions)"))
    if result.output is not None:
        rows.append(("buffers", str(result.output)))
    if result.plot is not None:
        rows.append(("plot", str(result.plot)))
    err.print(_key_value_table(f"tree {summary['name']}", rows))


# ---------------------------------------------------------------------------------------------
# medusa eval


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


@app.command(
    name="eval",
    epilog=(
        "DATA: hidden [T, hidden_size] (the base model's last hidden state after its final "
        "norm, the heads' input), tokens [T] (the base model's greedy token at each position) "
        "and optionally sequence [T] (positions of different sequences never pair), as one "
        ".npz or a directory of hidden.npy, tokens.npy, sequence.npy; README shows how to dump "
        "them with transformers. Head i at position t is right at rank r when its r-th ranked "
        "token is tokens[t + i + 1] (FasterDecoding's convention).\n\n"
        "Reports per head the per-rank accuracy, the cumulative top-k and 95% Wilson intervals, "
        "for the library and for the float64 oracle of the original checkpoint (as `medusa "
        "verify` reads it), so the difference is what quantization cost. -o also writes "
        "NAME.ranks.npy beside the JSON: the rank of the right token at every (position, head), "
        "-1 outside the top K, -2 without a right token, for `medusa tree-search --ranks`.\n\n"
        "**Examples**\n\n"
        "    medusa eval heads.so out/params --data eval.npz -o accuracy.json\n\n"
        "    medusa eval heads.so out/params --data dump/ --top-k 20 --plot accuracy.svg --json"
    ),
)
def eval_command(
    library: Path = typer.Argument(..., help="Library built by `medusa compile`."),
    params_dir: Path = typer.Argument(..., help="Its packed parameter directory."),
    data: Path = typer.Option(..., help=".npz of hidden, tokens[, sequence], or a directory of hidden.npy, tokens.npy[, sequence.npy]."),
    top_k: int = typer.Option(10, "--top-k", help="Ranks counted per head (Medusa's TOPK)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Accuracy JSON to write (ranks beside it as NAME.ranks.npy)."),
    plot: Optional[Path] = typer.Option(None, help="Draw each head's top-k accuracy, library against oracle, to this .svg."),
    device: str = typer.Option("cpu", help="cpu, cuda:0, ... or auto (where the library runs)."),
    source: Optional[Path] = typer.Option(None, help="Original checkpoint for the oracle (default: the one recorded in PARAMS_DIR)."),
    lm_head: Optional[Path] = typer.Option(None, help="Base-model weights file holding lm_head.weight, as given to `medusa convert --lm-head`."),
    oracle: bool = typer.Option(True, "--oracle/--no-oracle", help="Also rank with the float64 oracle (a pass over DATA per head)."),
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Measure how often each head's top-k holds the right token, on real hidden states."""
    from .commands.eval import EvalRequest, evaluate_heads

    request = EvalRequest(library=library, params_dir=params_dir, data=data, top_k=top_k,
                          output=output, plot=plot, device=device, source=source,
                          lm_head=lm_head, oracle=oracle)
    with _handle_errors(verbose), _count_progress("evaluating", "positions") as update:
        result = evaluate_heads(request, progress=update)
    for warning in result.warnings:
        _warn(warning)
    if json_out:
        _emit_json(result.to_dict())
        return
    k = result.top_k
    table = Table(title=f"eval {library.name} ({result.quantization}) on {result.data['positions']:,} "
                        f"positions; accuracy % (95% interval)", title_justify="left")
    for column in ("head", "samples", "top-1", f"top-{k}"):
        table.add_column(column, justify="right")
    if result.oracle is not None:
        for column in ("oracle top-1", f"oracle top-{k}", f"lost top-1/{k}"):
            table.add_column(column, justify="right")
    for index, head in enumerate(result.heads):
        low, high = head.to_dict()["top_k_interval"][-1]
        cells = [str(head.head), f"{head.samples:,}", _percent(head.top_k[0]),
                 f"{_percent(head.top_k[-1])} ({_percent(low)}-{_percent(high)})"]
        if result.oracle is not None:
            truth = result.oracle[index]
            cells += [_percent(truth.top_k[0]), _percent(truth.top_k[-1]),
                      f"{_percent(truth.top_k[0] - head.top_k[0])}/"
                      f"{_percent(truth.top_k[-1] - head.top_k[-1])}"]
        table.add_row(*cells)
    err.print(table)
    if result.source is not None:
        err.print(f"oracle: {escape(f'{result.source.kind} {result.source.path}')}", highlight=False, soft_wrap=True)
    written = [str(p) for p in (result.output, result.ranks_file, result.plot) if p is not None]
    if written:
        err.print(f"[green]wrote[/] {escape(', '.join(written))}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# medusa tree-search


def _parse_ints(text: Optional[str], flag: str, example: str) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values:
        raise InputError(f"{flag} {text!r}: expected comma-separated integers such as {example}")
    return values


@app.command(
    name="tree-search",
    epilog=(
        "Finds the tree of exactly N paths (the root, the base model's own token, comes on top) "
        "with the largest expected acceptance length, 1 + the sum over paths of the product of "
        "per-rank accuracies along the path: the N most likely paths, found best-first, which "
        "is optimal for any accuracies (FasterDecoding's greedy search, reported beside it, "
        "is optimal only while accuracy falls with rank). With --ranks it maximizes the "
        "acceptance measured on the data instead (no independence assumed) and reports both. "
        "The written tree lists its paths best first; `medusa compile --tree` and `medusa tree` "
        "load it.\n\n"
        "**Examples**\n\n"
        "    medusa tree-search --accuracy accuracy.json --nodes 16,32,64,128\n\n"
        "    medusa tree-search --accuracy accuracy.json --ranks accuracy.ranks.npy --nodes 63 -o tree.json\n\n"
        "    medusa tree-search --accuracy heads_accuracy.pt --nodes 63 --max-depth 4 --max-child 10,10,5,3 --plot tree.svg"
    ),
)
def tree_search_command(
    accuracy: Path = typer.Option(..., help="Per-rank accuracy of each head: `medusa eval -o` JSON or FasterDecoding's heads_accuracy.pt."),
    nodes: str = typer.Option(..., help="Paths in the tree, or sizes such as 16,32,64,128 for the curve."),
    max_depth: Optional[int] = typer.Option(None, help="Longest path (default: every head)."),
    max_child: Optional[str] = typer.Option(None, help="Ranks allowed per depth: one value, or one per depth such as 10,10,5,5 (default: every rank)."),
    ranks: Optional[Path] = typer.Option(None, help="The NAME.ranks.npy `medusa eval -o` wrote: maximize the acceptance measured on it."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="medusa_choices JSON to write (one --nodes value)."),
    plot: Optional[Path] = typer.Option(None, help="Draw the tree to this .svg (one --nodes value)."),
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Search the Medusa tree of N paths that accepts the most tokens per step."""
    from .commands.tree_search import TreeSearchRequest, search_tree

    with _handle_errors(verbose):
        request = TreeSearchRequest(
            accuracy=accuracy, nodes=_parse_ints(nodes, "--nodes", "64 or 16,32,64"),
            max_depth=max_depth, max_child=_parse_ints(max_child, "--max-child", "10 or 10,10,5,5"),
            ranks=ranks, output=output, plot=plot)
        result = search_tree(request)
    if json_out:
        _emit_json(result.to_dict())
        return
    measured = result.positions is not None
    table = Table(title=f"tree-search {accuracy.name}: tokens accepted per step "
                        f"(objective: {result.objective})", title_justify="left")
    for column in ("paths", "expected", "greedy expected") + (("measured",) if measured else ()):
        table.add_column(column, justify="right")
    for point in result.curve:
        cells = [str(point.nodes), f"{point.expected_acceptance_length:.4f}",
                 f"{point.greedy_expected_acceptance_length:.4f}"]
        if measured:
            cells.append(f"{point.measured_acceptance_length:.4f}")
        table.add_row(*cells)
    err.print(table)
    if measured:
        err.print(f"measured on {result.positions:,} positions of {escape(str(ranks))}", highlight=False, soft_wrap=True)
    written = [str(p) for p in (result.output, result.plot) if p is not None]
    if written:
        err.print(f"[green]wrote[/] {escape(', '.join(written))} (compile with --tree "
                  f"{escape(str(result.output or ''))} --topk {result.topk})" if result.output
                  else f"[green]wrote[/] {escape(', '.join(written))}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# medusa compile


@app.command(
    name="compile",
    epilog=(
        "**Examples**\n\n"
        "    medusa compile out/params --target llvm\n\n"
        "    medusa compile out/params --target cuda --arch sm_80,sm_90 -o out/heads-cuda.so\n\n"
        "    medusa compile out/params --target cpu --tree mc_sim_7b_63 --json\n\n"
        "    medusa compile out/params --target cuda --arch sm_90 --save-source out/kernels"
    ),
)
def compile_command(
    params_dir: Path = typer.Argument(..., help="Packed parameter directory written by `medusa convert`."),
    target: str = typer.Option("llvm", help="llvm, cpu (this CPU's features), cuda, rocm, vulkan, metal, opencl, webgpu, auto, or a TVM target JSON dict."),
    arch: Optional[str] = typer.Option(None, help="CUDA arch(es) such as sm_90 or sm_80,sm_90; ROCm arch such as gfx90a (default: the local GPU's)."),
    quantization: Optional[str] = typer.Option(None, "--quantization", "-q", help="Must match PARAMS_DIR's scheme (default: PARAMS_DIR's)."),
    max_batch_size: Optional[int] = typer.Option(None, help="Largest batch get_logits accepts (memory is planned for it); set by `medusa convert --max-batch-size` and read from PARAMS_DIR/mlc-chat-config.json; if given, it must equal that value."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Library to write: .so (default PARAMS_DIR/medusa-TARGET-QUANTIZATION.so), .tar (system library) or .wasm (webgpu)."),
    tree: Optional[str] = typer.Option(None, help="Also compile tree candidate generation for this tree (a shipped name or a JSON file of paths)."),
    topk: Optional[int] = typer.Option(None, help="Candidates per head for --tree (default 10)."),
    save_source: Optional[Path] = typer.Option(None, "--save-source", help="Also write the code the library was built from into this new (or empty) directory: a GPU library's device kernels (CUDA: one .cu file with every __global__ kernel; OpenCL .cl), a CPU library's LLVM IR."),
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Compile the heads in a packed directory into a TVM library for a target."""
    from .commands.compile import CompileRequest, compile_heads

    request = CompileRequest(
        params_dir=params_dir, target=target, arch=arch, quantization=quantization,
        max_batch_size=max_batch_size, output=output, tree=tree, topk=topk, save_source=save_source,
    )
    with _handle_errors(verbose), _status("compiling"):
        result = compile_heads(request)
    if json_out:
        _emit_json(result.to_dict())
        return
    err.print(
        f"[green]compiled[/] {params_dir} -> {result.output}: {result.metadata.quantization}, target "
        f"{result.metadata.target_name}, max batch {result.metadata.max_batch_size}, "
        f"{_human_bytes(result.output.stat().st_size)} in {result.seconds:.1f} s",
        highlight=False, soft_wrap=True)
    if result.save_source is not None:
        err.print(f"[green]source[/] in {result.save_source}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# medusa verify


def _number(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _verify_table(report) -> Table:
    table = Table(title=f"verify {report.library.name} ({report.thresholds.scheme}, {report.device})",
                  title_justify="left")
    table.add_column("head", justify="right")
    # "ref": the weights the library should hold; "src": the original checkpoint
    for name in ("ref", "src"):
        table.add_column(f"{name} err", justify="right")
        table.add_column(f"{name} cos", justify="right")
        table.add_column(f"{name} top1", justify="right")
    table.add_column("result")
    for head in report.heads:
        cells = [str(head.head)]
        for comparison in (head.vs_reference, head.vs_source):
            if comparison is None:
                cells += ["-", "-", "-"]
                continue
            metrics = comparison.metrics
            cells += [_number(metrics.max_rel_err), f"{metrics.cosine:.6f}", f"{comparison.top1:.2f}"]
        cells.append("[green]pass[/]" if head.passed else "[bold red]FAIL[/]")
        table.add_row(*cells)
    return table


@app.command(
    epilog=(
        "Exit codes: 0 every head passes; 1 verification failed: a head's numbers are out of "
        "bounds, or PARAMS_DIR is corrupted (a shard's md5 or size) or does not match the library "
        "(so CI gates on both); 2 the command could not run (missing paths, bad flags, --inputs of "
        "the wrong shape).\n\n"
        "Each head is compared with the float64 numpy oracle twice: with the weights the library "
        "should hold (dequantized or rounded to the model dtype; --rtol, --atol, --min-cosine, "
        "--min-top1, --min-topk) and with the original checkpoint (quantization error included; "
        "--source-rtol, --source-min-cosine, --source-min-top1). Defaults per scheme are in "
        "configs/thresholds.json.\n\n"
        "**Examples**\n\n"
        "    medusa verify out/params/medusa-llvm-q4f16_1.so out/params\n\n"
        "    medusa verify heads.so out/params --source ./medusa-vicuna-7b-v1.3 --inputs hidden.npy\n\n"
        "    medusa verify heads.so out/params --json | jq .verdict"
    )
)
def verify(
    library: Path = typer.Argument(..., help="Library built by `medusa compile`."),
    params_dir: Path = typer.Argument(..., help="Its packed parameter directory."),
    source: Optional[Path] = typer.Option(None, help="Original checkpoint (default: the one recorded in PARAMS_DIR; without it, the packed weights)."),
    lm_head: Optional[Path] = typer.Option(None, help="Base-model weights file holding lm_head.weight, as given to `medusa convert --lm-head`."),
    device: str = typer.Option("cpu", help="cpu, cuda:0, rocm:0, ... or auto (where the library runs)."),
    batch: int = typer.Option(4, help="Rows of seeded random hidden states (without --inputs)."),
    inputs: Optional[Path] = typer.Option(None, help=".npy of real hidden states [batch, hidden_size]."),
    seed: int = typer.Option(0, help="Seed of the random hidden states."),
    topk: int = typer.Option(5, help="k of the top-k overlap."),
    rtol: Optional[float] = typer.Option(None, help="Max error vs reference, relative to the logits' peak."),
    atol: Optional[float] = typer.Option(None, help="Absolute error allowed on top of --rtol's."),
    min_cosine: Optional[float] = typer.Option(None, help="Worst row's cosine vs reference."),
    min_top1: Optional[float] = typer.Option(None, help="Top-1 agreement vs reference (near ties count)."),
    min_topk: Optional[float] = typer.Option(None, help="Top-k overlap vs reference."),
    source_rtol: Optional[float] = typer.Option(None, help="Max error vs the source, relative to the logits' peak."),
    source_min_cosine: Optional[float] = typer.Option(None, help="Worst row's cosine vs the source."),
    source_min_top1: Optional[float] = typer.Option(None, help="Top-1 agreement vs the source."),
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Check a compiled library and its parameters against a float64 numpy oracle of the heads."""
    from .commands.verify import VerifyRequest, verify_heads

    request = VerifyRequest(
        library=library, params_dir=params_dir, source=source, lm_head=lm_head, device=device,
        batch=batch, inputs=inputs, seed=seed, topk=topk, rtol=rtol, atol=atol,
        min_cosine=min_cosine, min_top1=min_top1, min_topk=min_topk, source_rtol=source_rtol,
        source_min_cosine=source_min_cosine, source_min_top1=source_min_top1,
    )
    with _handle_errors(verbose):
        with _status("verifying"):
            report = verify_heads(request)
        for warning in report.warnings:
            _warn(warning)
        if json_out:
            _emit_json(report.to_dict())
        elif report.heads:
            err.print(_verify_table(report))
            if report.tree is not None:
                t = report.tree
                agreement = ", ".join(f"{a:.0%}" for a in t.oracle_agreement_per_depth)
                colour = "green" if t.passed else "red"
                err.print(
                    f"[{colour}]tree {escape(t.name)}[/]: {t.nodes} nodes; candidates vs oracle per depth "
                    f"{agreement}{' (exact required)' if t.oracle_exact_required else ''}; "
                    f"{t.self_mismatches} differ from the library's own logits",
                    highlight=False, soft_wrap=True)
        if report.passed and not json_out:
            source_words = escape(f"{report.source.kind} {report.source.path}")
            err.print(f"[green]verified[/] {len(report.heads)} heads against {source_words}",
                      highlight=False, soft_wrap=True)
        report.raise_for_verdict()


# ---------------------------------------------------------------------------------------------
# medusa run


@app.command(
    epilog=(
        "Writes head_0 ... head_{n-1} (float32 [batch, vocab]) and, with --top-k, head_i_topk "
        "(int32 [batch, K], best first, ties to the lower token id); with --base-logits, "
        "tree_candidates [batch, nodes] and cart_candidates [batch, leaves, depth + 1] (int32).\n\n"
        "**Examples**\n\n"
        "    medusa run heads.so out/params --inputs hidden.npy -o logits.npz\n\n"
        "    medusa run heads.so out/params --inputs hidden.npy -o logits.npz --top-k 10 --device cuda:0\n\n"
        "    medusa run tree.so out/params --inputs hidden.npy --base-logits base.npy -o candidates.npz"
    )
)
def run(
    library: Path = typer.Argument(..., help="Library built by `medusa compile`."),
    params_dir: Path = typer.Argument(..., help="Its packed parameter directory."),
    inputs: Path = typer.Option(..., help=".npy of hidden states [batch, hidden_size]."),
    output: Path = typer.Option(..., "--output", "-o", help=".npz file to write."),
    device: str = typer.Option("cpu", help="cpu, cuda:0, rocm:0, ... or auto (where the library runs)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Also write each head's top-K token ids."),
    base_logits: Optional[Path] = typer.Option(
        None, help=".npy of the base model's logits [batch, vocab]: also write tree_candidates and "
        "cart_candidates (library compiled with --tree)."),
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Run the compiled heads on hidden states and write their logits (and tree candidates)."""
    from .commands.run import RunRequest, run_heads

    request = RunRequest(library=library, params_dir=params_dir, inputs=inputs, output=output,
                         device=device, top_k=top_k, base_logits=base_logits)
    with _handle_errors(verbose):
        result = run_heads(request)
    if json_out:
        _emit_json(result.to_dict())
        return
    top = f", top-{result.top_k} ids" if result.top_k else ""
    if "tree_candidates" in result.arrays:
        top += ", tree candidates"
    err.print(
        f"[green]wrote[/] {result.output}: {result.num_heads} heads x batch {result.batch} x vocab "
        f"{result.vocab_size}{top} in {result.seconds:.2f} s",
        highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# medusa build


@app.command(
    epilog=(
        "OUT_DIR receives params/, the library and build-report.json, all at once and only if "
        "the build passes: a failed verification (exit 1) or an error (exit 2) leaves nothing. "
        "Libraries for a device this machine lacks are built and published with verification "
        "skipped (the report says why).\n\n"
        "**Examples**\n\n"
        "    medusa build ./medusa-vicuna-7b-v1.3 --target llvm --quantization q4f16_1 -o out/build\n\n"
        "    medusa build ckpt --target cuda --arch sm_90 -q q0f16 -o out/cuda --json > report.json"
    )
)
def build(
    source: Path = typer.Argument(..., help="Checkpoint directory, weights file or shard index."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write (params/, library, build-report.json)."),
    target: str = typer.Option("llvm", help="As for `medusa compile --target`."),
    quantization: Optional[str] = typer.Option(None, "--quantization", "-q", help="q0f32, q0f16, q0bf16, q4f16_1, q4f32_1 or q3f16_1 (default: the source's dtype)."),
    arch: Optional[str] = typer.Option(None, help="As for `medusa compile --arch`."),
    layout: str = typer.Option("auto", help="auto, medusa1, medusa2, trtllm, vllm or mlc."),
    lm_head: Optional[Path] = typer.Option(None, help="Base-model weights file holding lm_head.weight, for heads without their own."),
    max_batch_size: int = typer.Option(DEFAULT_MAX_BATCH_SIZE, help="Largest batch the library accepts."),
    conv_template: str = typer.Option("vicuna_v1.1", help="As for `medusa convert --conv-template`."),
    batch: int = typer.Option(4, help="Rows of random hidden states the verification uses."),
    seed: int = typer.Option(0, help="Seed of those hidden states."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUTPUT."),
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Convert, compile and verify in one command, with one JSON report (for CI)."""
    from .commands.build import BuildRequest, build_heads

    request = BuildRequest(
        source=source, output=output, target=target, quantization=quantization, arch=arch,
        layout=layout, lm_head=lm_head, max_batch_size=max_batch_size, batch=batch, seed=seed,
        force=force, conv_template=conv_template,
    )
    with _handle_errors(verbose):
        with _status("building") as status:
            report = build_heads(request, stage=lambda name: status.update(f"{name}..."))
        for warning in report.warnings:
            _warn(warning)
        if json_out:
            _emit_json(report.to_dict())
        else:
            rows = [("verdict", report.verdict), ("params", report.params_dir), ("library", report.library)]
            if report.skipped:
                rows.append(("verification", f"skipped: {report.skipped}"))
            rows += [(f"{stage} seconds", f"{seconds:.1f}") for stage, seconds in report.seconds.items()]
            err.print(_key_value_table(f"build {report.output}", rows))
        report.raise_for_verdict()


# ---------------------------------------------------------------------------------------------
# medusa bench


def _parse_batches(text: str) -> tuple[int, ...]:
    return _parse_ints(text, "--batch", "1,4,8")


@app.command(
    epilog=(
        "Times get_logits on inputs already on the device, up to the device's completion "
        "(warm-up, then median and p10-p90 of --repeat runs) and reports the effective GB/s of "
        "weight bytes read, the ratio to the memory-bandwidth floor (weight bytes / bandwidth "
        "measured in the same run: reading a buffer on a CPU, a device-to-device copy on a GPU) "
        "and to numpy computing the same heads in float32 on the host, timed back to back with "
        "the library. With a tree, also the cost of get_tree_candidates. TVM's CPU threads: all "
        "cores; set TVM_NUM_THREADS to change.\n\n"
        "**Examples**\n\n"
        "    medusa bench heads.so out/params --batch 1,4,8\n\n"
        "    medusa bench heads.so out/params --repeat 50 --json > bench.json"
    )
)
def bench(
    library: Path = typer.Argument(..., help="Library built by `medusa compile`."),
    params_dir: Path = typer.Argument(..., help="Its packed parameter directory."),
    batch: str = typer.Option("1,8", help="Comma-separated batch sizes."),
    device: str = typer.Option("cpu", help="cpu, cuda:0, ... (where the library runs)."),
    repeat: int = typer.Option(20, help="Timed runs per batch size."),
    warmup: int = typer.Option(3, help="Untimed runs first."),
    no_numpy: bool = typer.Option(False, "--no-numpy", help="Skip the numpy float32 baseline."),
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Time the compiled heads against the memory-bandwidth floor and numpy, in one run."""
    from .commands.bench import BenchRequest, bench_heads

    with _handle_errors(verbose):
        request = BenchRequest(library=library, params_dir=params_dir, batches=_parse_batches(batch),
                               device=device, repeat=repeat, warmup=warmup, numpy_baseline=not no_numpy)
        with _status("benchmarking"):
            report = bench_heads(request)
    if json_out:
        _emit_json(report.to_dict())
        return
    threads = f", {report.num_threads} threads" if report.num_threads else ""
    table = Table(title=f"bench {library.name} ({report.quantization}, {report.device}{threads}; "
                        f"bandwidth {report.bandwidth_gbps:.1f} GB/s, {report.bandwidth_method})",
                  title_justify="left")
    for column in ("batch", "ms (p10-p90)", "GB/s", "vs floor", "numpy ms", "vs numpy"):
        table.add_column(column, justify="right")
    for r in report.rows:
        table.add_row(
            str(r.batch),
            f"{r.library.median_s * 1e3:.2f} ({r.library.p10_s * 1e3:.2f}-{r.library.p90_s * 1e3:.2f})",
            f"{r.gbps:.1f}",
            f"{r.vs_floor:.2f}x",
            "-" if r.numpy is None else f"{r.numpy.median_s * 1e3:.2f}",
            "-" if r.vs_numpy is None else f"{r.vs_numpy:.2f}x",
        )
    err.print(table)
    for t in report.tree:
        err.print(
            f"tree batch {t.batch}: get_tree_candidates {t.get_tree_candidates * 1e3:.2f} ms vs "
            f"get_logits {t.get_logits * 1e3:.2f} ms; top-k and gathers add "
            f"{t.candidates_cost * 1e3:.2f} ms",
            highlight=False, soft_wrap=True)
    err.print(f"machine: {escape(report.machine)}", highlight=False, soft_wrap=True)


if __name__ == "__main__":  # pragma: no cover
    app()
