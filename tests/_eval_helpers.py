"""An evaluation bench built once per test session: the eval-tiny checkpoint with its seeded
evaluation set (accuracies known by construction), converted and compiled per scheme."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from medusa_cli.commands.compile import CompileRequest, compile_heads
from medusa_cli.commands.convert import ConvertRequest, convert_checkpoint
from medusa_cli.commands.example import ExampleRequest, write_example

POSITIONS = 256
SEQUENCE_LENGTH = 32
MAX_BATCH = 8


@dataclasses.dataclass
class Bench:
    root: Path
    ckpt: Path
    eval_set: Path
    # the set's arrays: hidden, tokens, sequence, designed_ranks, designed_accuracy
    arrays: dict
    libraries: dict  # scheme -> (library, params)

    def build(self, scheme: str) -> tuple[Path, Path]:
        if scheme not in self.libraries:
            params = self.root / f"params-{scheme}"
            convert_checkpoint(ConvertRequest(source=self.ckpt, output=params, quantization=scheme,
                                              max_batch_size=MAX_BATCH))
            library = compile_heads(CompileRequest(params, output=params / "heads.so")).output
            self.libraries[scheme] = (library, params)
        return self.libraries[scheme]


_BENCHES: dict[str, Bench] = {}


def eval_bench(tmp_path_factory) -> Bench:
    """The session's bench (one for every test module that asks)."""
    if "bench" not in _BENCHES:
        root = tmp_path_factory.mktemp("eval-bench")
        ckpt, eval_set = root / "ckpt", root / "eval.npz"
        write_example(ExampleRequest(output=ckpt, preset="eval-tiny", seed=3, eval_set=eval_set,
                                     eval_positions=POSITIONS, eval_sequence_length=SEQUENCE_LENGTH))
        with np.load(eval_set) as loaded:
            arrays = {name: loaded[name] for name in loaded.files}
        _BENCHES["bench"] = Bench(root, ckpt, eval_set, arrays, {})
    return _BENCHES["bench"]
