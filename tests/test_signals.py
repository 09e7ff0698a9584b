"""Termination signals and races, with real child processes.

Each child runs the real `medusa` CLI (medusa_cli.cli.app) in its own Python process, with one
step of the command held open so the parent knows where it is when it acts: the child touches a
marker file and waits there. The parent then sends the signal, or lets two children publish into
one output at once. Checked: the exit code (128 + the signal's number, as a shell reports it),
one `interrupted:` line, and that no staging directory or .partial file is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medusa_cli.commands.convert import ConvertRequest, convert_checkpoint
from medusa_cli.commands.example import ExampleRequest, write_example

from .conftest import check_packed_dir

# Children run the CLI after patching steps ("module:attribute=mode", joined by ";") to touch a
# marker (PREFIX0 for the first step, PREFIX1 for the second...) and then, by mode: "signal"
# waits for the parent's signal, "sleep:S" waits S seconds, "barrier:A,B" waits until the files
# A and B exist (every child has arrived).
_CHILD = textwrap.dedent("""
    import importlib, sys, time
    from pathlib import Path

    prefix, holds = sys.argv[1:3]

    def hold(index, spec):
        where, _, mode = spec.partition("=")
        module, _, attribute = where.partition(":")
        owner_name, _, name = attribute.rpartition(".")
        owner = importlib.import_module(module)
        if owner_name:
            owner = getattr(owner, owner_name)
        original = getattr(owner, name)

        calls = []

        def held(*args, **kwargs):
            calls.append(1)
            if len(calls) > 1:  # only the first call is held
                return original(*args, **kwargs)
            Path(prefix + str(index)).touch()
            kind, _, value = mode.partition(":")
            if kind == "barrier":
                deadline = time.monotonic() + 120
                while not all(Path(p).exists() for p in value.split(",")):
                    if time.monotonic() > deadline:
                        raise SystemExit("the other child never arrived")
                    time.sleep(0.02)
            else:
                time.sleep(float(value) if kind == "sleep" else 120)
            return original(*args, **kwargs)

        setattr(owner, name, held)

    for index, spec in enumerate(holds.split(";")):
        hold(index, spec)
    from medusa_cli.cli import app
    sys.argv = ["medusa", *sys.argv[3:]]
    app()
""")


_CHILDREN: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_child_outlives_its_test():
    yield
    while _CHILDREN:
        child = _CHILDREN.pop()
        if child.poll() is None:
            child.kill()
            child.communicate()


def _start(markers: Path, holds: list[str], args: list) -> subprocess.Popen:
    """A child running `medusa ARGS` with `holds` patched in; step i touches `markers`i."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(markers), ";".join(holds), *[str(a) for a in args]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=markers.parent,
        env={**os.environ, "COLUMNS": "200"})
    _CHILDREN.append(child)
    return child


def _marker(markers: Path, index: int) -> Path:
    return markers.parent / f"{markers.name}{index}"


def _wait_for(path: Path, child: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if child.poll() is not None:
            raise AssertionError(f"the child ended first: {child.communicate()}")
        assert time.monotonic() < deadline, "the child never reached the held step"
        time.sleep(0.02)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_example(ExampleRequest(output=tmp_path_factory.mktemp("signals") / "ckpt",
                                        preset="tiny", layout="medusa1")).output


@pytest.fixture(scope="module")
def params(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("signals-params") / "params"
    convert_checkpoint(ConvertRequest(source=checkpoint, output=out))
    return out


# the step each command is held at: one with its output staged and partly written
_HOLDS = {
    # after the first tensor is in a shard of the staging directory
    "convert": "medusa_cli.packed.tensor_cache:_ShardWriter.append",
    # inside staged_file: the .partial library exists, TVM has built the module
    "compile": "medusa_cli.compiler.pipeline:metadata_c_source",
}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=["SIGTERM", "SIGHUP", "SIGINT"])
@pytest.mark.parametrize("command", ["convert", "compile"])
def test_a_signal_mid_write_cleans_up_and_exits_128_plus_its_number(command, signum, checkpoint,
                                                                    params, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if command == "convert":
        output = out_dir / "params"
        args = ["convert", checkpoint, "-o", output]
    else:
        output = out_dir / "heads.so"
        args = ["compile", params, "-o", output, "--target", "llvm"]
    markers = tmp_path / "held-"
    child = _start(markers, [_HOLDS[command] + "=signal"], args)
    _wait_for(_marker(markers, 0), child)
    assert _leftovers(out_dir), "the held step should have an output staged"
    child.send_signal(signum)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + signum, stderr
    assert f"interrupted: {signal.Signals(signum).name}; nothing was written" in stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not output.exists()
    assert _leftovers(out_dir) == [] and list(out_dir.iterdir()) == []


def test_a_second_signal_during_cleanup_does_not_cut_it_short(checkpoint, tmp_path):
    """The first SIGTERM starts the cleanup; more that arrive while it runs are ignored."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    markers = tmp_path / "held-"
    # held mid-write until the first signal, then in the staging directory's removal
    child = _start(markers, [_HOLDS["convert"] + "=signal", "medusa_cli.outputs:shutil.rmtree=sleep:2"],
                   ["convert", checkpoint, "-o", out_dir / "params"])
    _wait_for(_marker(markers, 0), child)
    child.send_signal(signal.SIGTERM)
    _wait_for(_marker(markers, 1), child)
    child.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    child.send_signal(signal.SIGHUP)
    _, stderr = child.communicate(timeout=180)
    assert child.returncode == 128 + signal.SIGTERM, stderr
    assert _leftovers(out_dir) == [] and list(out_dir.iterdir()) == []


@pytest.mark.parametrize("existing", ["empty directory", "no directory"])
def test_two_converts_into_one_output_one_wins_the_other_fails(existing, checkpoint, tmp_path):
    """Both children stage a whole conversion, then publish at the same moment: one rename
    lands, the other finds a non-empty directory in its place and fails; nothing is replaced."""
    output = tmp_path / "params"
    if existing == "empty directory":
        output.mkdir()
    prefixes = [tmp_path / "first-", tmp_path / "second-"]
    barrier = "barrier:" + ",".join(str(_marker(p, 0)) for p in prefixes)
    children = [
        _start(prefix, [f"medusa_cli.outputs:StagedDirectory.publish={barrier}"],
               ["convert", checkpoint, "-o", output, "--json", "--max-batch-size", str(4 + i)])
        for i, prefix in enumerate(prefixes)
    ]
    results = [(child, *child.communicate(timeout=240)) for child in children]
    codes = sorted(child.returncode for child, _, _ in results)
    assert codes == [0, 2], [stderr for _, _, stderr in results]
    (_, stdout, _), = [r for r in results if r[0].returncode == 0]
    (_, _, stderr), = [r for r in results if r[0].returncode == 2]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "something else was written there while this ran" in errors[0]
    assert "nothing was replaced" in errors[0] and "Traceback" not in stderr
    # what is there is the winner's, whole
    batch = json.loads(stdout)["config"]["max_batch_size"]
    config = json.loads((output / "mlc-chat-config.json").read_text())
    assert config["model_config"]["max_batch_size"] == batch
    check_packed_dir(output)
    assert _leftovers(tmp_path) == []
