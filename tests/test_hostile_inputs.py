"""Hostile files through the CLI: every reader, one `error:` line, no traceback, nothing written.

Each case builds a broken or malicious input in tmp_path and runs one command through Typer's
CliRunner (an uncaught exception would show as exit 1 without an `error:` line). Every case
checks the exit code (2 for a bad input, 1 where verification fails), that stderr holds exactly
one `error:` line naming the file and the problem, and that nothing was written: no output, no
staging leftovers, no file of the tmp directory changed.

The readers: safetensors headers, PyTorch zip archives (.pt/.bin), shard indexes, config.json,
mlc-chat-config.json, tensor-cache.json, tree JSON files, hidden-state and base-logits .npy files,
and a library's embedded metadata (a file with our marker is read, never loaded).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import pickle
import shutil
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medusa_cli.checkpoint.pytorch import (
    _ArchiveWriter,
    _pickle_state_dict,
    _StorageRef,
    _TensorRecord,
    save_torch_checkpoint,
)
from medusa_cli.checkpoint.safetensors import write_safetensors
from medusa_cli.cli import app
from medusa_cli.commands.convert import ConvertRequest, convert_checkpoint
from medusa_cli.library import METADATA_MARKER, LibraryMetadata
from medusa_cli.quantization import get_scheme
from medusa_cli.spec import MedusaConfig, param_specs

runner = CliRunner()

HIDDEN, VOCAB, HEADS = 8, 16, 2
DEEP = 100_000


def _cli(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------
# builders of valid and broken files


def head_tensors(heads: int = HEADS, hidden: int = HIDDEN, vocab: int = VOCAB,
                 dtype=np.float32) -> dict[str, np.ndarray]:
    """A medusa1-layout checkpoint: one ResBlock per head, then the vocab projection."""
    rng = np.random.default_rng(0)
    tensors = {}
    for h in range(heads):
        tensors[f"{h}.0.linear.weight"] = (rng.standard_normal((hidden, hidden)) * 0.1).astype(dtype)
        tensors[f"{h}.0.linear.bias"] = (rng.standard_normal(hidden) * 0.1).astype(dtype)
        tensors[f"{h}.1.weight"] = (rng.standard_normal((vocab, hidden)) * 0.1).astype(dtype)
    return tensors


def write_st(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    specs = [(name, a.shape, str(a.dtype), lambda a=a: a) for name, a in tensors.items()]
    write_safetensors(path, specs)
    return path


def write_raw_st(path: Path, header: bytes | object, data: bytes = b"") -> Path:
    """A safetensors file with any header (JSON-encoded unless given as bytes) and data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def st_header(tensors: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    """The header and data section write_safetensors would write, to edit before writing."""
    header, data, offset = {}, b"", 0
    for name, array in tensors.items():
        header[name] = {"dtype": {"float32": "F32", "int32": "I32"}[str(array.dtype)],
                        "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        data += array.tobytes()
        offset += array.nbytes
    return header, data


def edited_st(tmp: Path, edit: Callable[[dict], None], tensors=None) -> Path:
    header, data = st_header(tensors or head_tensors())
    edit(header)
    return write_raw_st(tmp / "ckpt" / "model.safetensors", header, data)


def ckpt_dir(tmp: Path, tensors=None, config: object = None) -> Path:
    folder = tmp / "ckpt"
    write_st(folder / "model.safetensors", tensors or head_tensors())
    if config is not None:
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


def write_pt_records(path: Path, storage: np.ndarray, records: list[tuple[str, int, tuple, tuple]]):
    """A .pt whose tensors (name, offset, shape, stride) all view one storage."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file, _ArchiveWriter(file) as writer:
        ref = writer.add_storage(storage)
        writer.finish((name, _TensorRecord(ref, ref.dtype, offset, shape, stride))
                      for name, offset, shape, stride in records)
    return path


def pt_with_pickle(path: Path, data_pkl: bytes, compress: int = zipfile.ZIP_STORED,
                   extra: dict[str, bytes] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", b"little")
        zf.writestr("archive/version", b"3\n")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def index_dir(tmp: Path, weight_map: object, shard_tensors=None) -> Path:
    folder = tmp / "ckpt"
    write_st(folder / "model-00001.safetensors", shard_tensors or head_tensors())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def written(path: Path, data: bytes | str) -> Path:
    """path, created with `data` (and its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def deep_json(open_: str = '{"a":', close: str = "}", depth: int = DEEP) -> str:
    return open_ * depth + "1" + close * depth


# --- zip archives: PyTorch checkpoints with members that lie --------------------------------


def _pt(tmp: Path) -> Path:
    path = tmp / "ckpt" / "heads.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch_checkpoint(head_tensors(), path)
    return path


def _pt_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _pt_compression(tmp: Path, method: int) -> Path:
    path = _pt(tmp)
    members = _pt_members(path)
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for member, content in members.items():
            zf.writestr(member, content)
    return path


def zip_bytes(members: list[tuple]) -> bytes:
    """A zip archive of members (name, data, declared size[, method, real size, crc]): data is
    stored as given (already compressed for method 8); the central directory, which zipfile
    reads, declares `declared` uncompressed bytes, truthfully or not."""
    out, central = b"", b""
    for name, data, declared, *rest in members:
        method, real, crc = rest if rest else (0, len(data), zlib.crc32(data))
        raw = name.encode()
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data),
                           min(real, 0xFFFFFFFF), len(raw), 0) + raw + data
        extra, sizes = b"", (declared, len(data))
        if declared >= 0xFFFFFFFF:
            extra = struct.pack("<HHQQ", 1, 16, declared, len(data))
            sizes = (0xFFFFFFFF, 0xFFFFFFFF)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, method, 0, 0x21, crc,
                               sizes[1], sizes[0], len(raw), len(extra), 0, 0, 0, 0,
                               offset) + raw + extra
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central),
                      len(out), 0)
    return out + central + end


def deflated_zeros(size: int) -> tuple[bytes, int]:
    """(raw deflate stream of `size` zero bytes, their crc32), made a MiB at a time."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk, crc, parts = b"\0" * (1 << 20), 0, []
    for _ in range(size >> 20):
        parts.append(packer.compress(chunk))
        crc = zlib.crc32(chunk, crc)
    parts.append(packer.flush())
    return b"".join(parts), crc


def zip_bomb_pt(tmp: Path, member: str, size: int = 64 << 20) -> Path:
    """A .pt whose `member` inflates from a few hundred KB to `size` bytes."""
    pkl = pickle.dumps({}, protocol=2)
    members = {"archive/data.pkl": (pkl, len(pkl)), "archive/byteorder": (b"little", 6)}
    packed, crc = deflated_zeros(size)
    entries = [(name, data, declared) for name, (data, declared) in members.items() if name != member]
    entries.append((member, packed, size, 8, size, crc))
    path = tmp / "ckpt" / "heads.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zip_bytes(entries))
    return path


def _pt_member_size(tmp: Path, declared: int) -> Path:
    """A stored storage member of 256 bytes whose central-directory entry claims `declared`,
    and a pickle whose storage numel and tensor claim as much."""
    ref = _StorageRef(key="0", dtype=np.dtype(np.float32), numel=declared // 4)
    record = _TensorRecord(ref, ref.dtype, 0, (declared // 4,), (1,))
    pkl = _pickle_state_dict([("0.1.weight", record)])
    path = tmp / "ckpt" / "heads.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zip_bytes([("archive/data.pkl", pkl, len(pkl)),
                                ("archive/data/0", b"\0" * 256, declared),
                                ("archive/byteorder", b"little", 6)]))
    return path


def _pt_corrupt_compressed(tmp: Path) -> Path:
    path = _pt_compression(tmp, zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("archive/data.pkl")
    # the member's CRC in both headers no longer matches its bytes
    for offset in (info.header_offset + 14, data.rfind(b"archive/data.pkl") - 46 + 16):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _pt_truncated_member(tmp: Path) -> Path:
    path = _pt_compression(tmp, zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("archive/data.pkl")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    # the compressed stream ends early: its bytes after the first few are zeros
    data[start + 8:start + info.compress_size] = b"\0" * (info.compress_size - 8)
    path.write_bytes(bytes(data))
    return path


def _pt_cut_short(tmp: Path) -> Path:
    """data.pkl deflated, its compressed stream cut in half where the archive says it ends."""
    pkl = _pickle_state_dict([])
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = packer.compress(pkl * 50) + packer.flush()
    path = tmp / "ckpt" / "heads.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zip_bytes([("archive/data.pkl", packed[:len(packed) // 2], len(pkl) * 50, 8,
                                 len(pkl) * 50, zlib.crc32(pkl * 50)),
                                ("archive/byteorder", b"little", 6)]))
    return path


def _pt_encrypted(tmp: Path) -> Path:
    path = _pt(tmp)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    for info in infos:  # the "encrypted" flag bit in the local and central headers
        data[info.header_offset + 6] |= 1
    pos = data.rfind(b"PK\x05\x06")
    (cd_offset,) = struct.unpack_from("<I", data, pos + 16)
    while data[cd_offset:cd_offset + 4] == b"PK\x01\x02":
        data[cd_offset + 8] |= 1
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, cd_offset + 28)
        cd_offset += 46 + name_len + extra_len + comment_len
    path.write_bytes(bytes(data))
    return path


# --- packed directories and libraries -----------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """A valid checkpoint, its packed directory (q0f32, max batch 8) and a file holding valid
    library metadata for them (never loaded: our marker is read from the bytes)."""
    root = tmp_path_factory.mktemp("hostile-base")
    ckpt = ckpt_dir(root)
    params = root / "params"
    convert_checkpoint(ConvertRequest(source=ckpt, output=params))
    return {"root": root, "ckpt": ckpt, "params": params}


def valid_metadata() -> dict:
    config = MedusaConfig(HEADS, 1, HIDDEN, VOCAB, max_batch_size=8)
    scheme = get_scheme("q0f32")
    return LibraryMetadata(config=config, quantization="q0f32", dtype="float32",
                           params=param_specs(config, scheme), target={"kind": "llvm"},
                           target_name="llvm", device_code="host", cuda_arches=[],
                           memory_usage={}).to_json()


def fake_library(path: Path, metadata: object = None, raw: bytes | None = None) -> Path:
    """A file shaped like a shared library holding our metadata marker (read, never loaded)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if raw is None:
        raw = base64.b64encode(json.dumps(valid_metadata() if metadata is None else metadata).encode())
    path.write_bytes(b"\x7fELF" + b"\0" * 60 + METADATA_MARKER + raw + b"\0" + b"\0" * 16)
    return path


def edited_metadata(edit: Callable[[dict], None]) -> dict:
    data = valid_metadata()
    edit(data)
    return data


def params_copy(base, tmp: Path, edit_config: Callable[[dict], None] | None = None,
                edit_cache: Callable[[dict], None] | None = None) -> Path:
    params = tmp / "params"
    shutil.copytree(base["params"], params)
    for name, edit in (("mlc-chat-config.json", edit_config), ("tensor-cache.json", edit_cache)):
        if edit is not None:
            data = json.loads((params / name).read_text())
            edit(data)
            (params / name).write_text(json.dumps(data))
    return params


def npy_with_header(path: Path, header: dict, data: bytes = b"") -> Path:
    """A .npy file with any header dict (shape, descr, fortran_order) and data."""
    text = repr(header).encode("latin1")
    pad = -(10 + len(text) + 1) % 64
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text) + pad + 1) + text
                     + b" " * pad + b"\n" + data)
    return path


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


# ---------------------------------------------------------------------------------------------
# the corpus: (builder of the command line, exit code, words the error line must hold)


@dataclasses.dataclass(frozen=True)
class Case:
    # args(tmp, base) -> the command line; "OUT" stands for the output path
    args: Callable[[Path, dict], list]
    words: tuple[str, ...]
    code: int = 2


def convert(make_src: Callable[[Path], Path], *extra) -> Callable:
    return lambda tmp, base: ["convert", make_src(tmp), "-o", "OUT", *extra]


def inspect(make_src: Callable[[Path], Path]) -> Callable:
    return lambda tmp, base: ["inspect", make_src(tmp)]


def both(make_src: Callable[[Path], Path], words: tuple[str, ...]) -> dict[str, Case]:
    """A checkpoint case through convert and inspect."""
    return {"convert": Case(convert(make_src), words), "inspect": Case(inspect(make_src), words)}


def _st(edit):
    return lambda tmp: edited_st(tmp, edit)


def _set(name: str, key: str, value):
    def edit(header):
        header[name][key] = value
    return edit


CHECKPOINT_CASES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    # --- safetensors headers
    "st-header-list": (lambda tmp: write_raw_st(tmp / "ckpt" / "model.safetensors", b"[]"),
                       ("model.safetensors", "not a JSON object")),
    "st-header-deep": (lambda tmp: write_raw_st(tmp / "ckpt" / "model.safetensors",
                                                deep_json().encode()),
                       ("model.safetensors", "nests too deep")),
    "st-header-deep-list": (lambda tmp: write_raw_st(tmp / "ckpt" / "model.safetensors",
                                                     ('{"a":' + deep_json("[", "]")).encode() + b"}"),
                            ("model.safetensors", "nests too deep")),
    "st-header-not-utf8": (lambda tmp: write_raw_st(tmp / "ckpt" / "model.safetensors", b'{"\xff": 1}'),
                           ("model.safetensors", "not a readable safetensors file")),
    "st-header-huge-int": (lambda tmp: write_raw_st(tmp / "ckpt" / "model.safetensors",
                                                    b'{"a": ' + b"9" * 5000 + b"}"),
                           ("model.safetensors", "not a readable safetensors file")),
    "st-empty-file": (lambda tmp: written(tmp / "ckpt" / "model.safetensors", b"").parent,
                      ("model.safetensors", "shorter than")),
    "st-header-length-past-end": (
        lambda tmp: written(tmp / "ckpt" / "model.safetensors", struct.pack("<Q", 1 << 40) + b"{}"),
        ("model.safetensors", "header length")),
    "st-shape-overflows-int64": (_st(_set("0.1.weight", "shape", [2**32, 2**32])),
                                 ("model.safetensors", "0.1.weight")),
    "st-shape-wraps-to-zero": (_st(_set("0.1.weight", "shape", [2**64, 0])),
                               ("model.safetensors", "0.1.weight", "int64")),
    "st-shape-negative": (_st(_set("0.1.weight", "shape", [-16, -8])),
                          ("model.safetensors", "0.1.weight", "shape")),
    "st-shape-float": (_st(_set("0.1.weight", "shape", [16.0, 8])),
                       ("model.safetensors", "0.1.weight", "shape")),
    "st-shape-bool": (_st(_set("0.1.weight", "shape", [True, 8])),
                      ("model.safetensors", "0.1.weight", "shape")),
    "st-shape-not-list": (_st(_set("0.1.weight", "shape", "16x8")),
                          ("model.safetensors", "0.1.weight", "shape")),
    "st-offsets-negative": (_st(_set("0.0.linear.weight", "data_offsets", [-256, 0])),
                            ("model.safetensors", "0.0.linear.weight", "data_offsets")),
    "st-offsets-three": (_st(_set("0.0.linear.weight", "data_offsets", [0, 128, 256])),
                         ("model.safetensors", "0.0.linear.weight", "data_offsets")),
    "st-offsets-overlap": (_st(lambda h: h["0.0.linear.bias"].update(data_offsets=[0, 32])),
                           ("model.safetensors", "overlaps")),
    "st-offsets-gap": (_st(lambda h: h.__setitem__("0.0.linear.weight", {
        **h["0.0.linear.weight"], "data_offsets": [h["0.0.linear.weight"]["data_offsets"][0] + 4,
                                                   h["0.0.linear.weight"]["data_offsets"][1] + 4]})),
                       ("model.safetensors", "data_offsets")),
    "st-dtype-unknown": (_st(_set("0.0.linear.weight", "dtype", "F128")),
                         ("model.safetensors", "0.0.linear.weight", "dtype")),
    "st-dtype-not-string": (_st(_set("0.0.linear.weight", "dtype", 7)),
                            ("model.safetensors", "0.0.linear.weight", "dtype")),
    "st-entry-not-object": (_st(lambda h: h.__setitem__("0.0.linear.bias", [1, 2])),
                            ("model.safetensors", "0.0.linear.bias")),
    "st-metadata-not-object": (_st(lambda h: h.__setitem__("__metadata__", [1])),
                               ("model.safetensors", "__metadata__")),
    "st-name-with-newline-and-escape": (_st(lambda h: h.__setitem__(
        "0.0.linear.weight\nerror: forged\x1b[2J", {**h.pop("0.0.linear.weight"), "dtype": "F128"})),
        ("model.safetensors", "0.0.linear.weight\\nerror: forged\\x1b[2J", "dtype")),
    "st-name-of-a-megabyte": (_st(lambda h: h.__setitem__(
        "x" * (1 << 20), {**h.pop("0.0.linear.weight"), "dtype": "F128"})),
        ("model.safetensors", "x" * 200, "dtype")),
    "st-duplicate-key": (lambda tmp: write_raw_st(
        tmp / "ckpt" / "model.safetensors",
        json.dumps(st_header(head_tensors())[0])[:-1].encode()
        + b', "0.1.weight": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}',
        st_header(head_tensors())[1]),
        ("model.safetensors", "0.1.weight", "twice")),
    # --- what the tensors say
    "integer-vocab-projection": (lambda tmp: ckpt_dir(tmp, {
        **head_tensors(), "0.1.weight": np.ones((VOCAB, HIDDEN), np.int32),
        "1.1.weight": np.ones((VOCAB, HIDDEN), np.int32)}),
        ("0.1.weight", "dtype int32")),
    "integer-resblock": (lambda tmp: ckpt_dir(tmp, {
        **head_tensors(), "1.0.linear.weight": np.ones((HIDDEN, HIDDEN), np.int32)}),
        ("1.0.linear.weight", "dtype int32")),
    "hidden-size-zero": (lambda tmp: ckpt_dir(tmp, head_tensors(hidden=0)),
                         ("0.1.weight", "[16, 0]")),
    "vocab-size-zero": (lambda tmp: ckpt_dir(tmp, head_tensors(vocab=0)),
                        ("0.1.weight", "[0, 8]")),
    "vocab-projection-1d": (lambda tmp: ckpt_dir(tmp, {
        **head_tensors(), "0.1.weight": np.ones(VOCAB, np.float32)}),
        ("0.1.weight", "[vocab, hidden]")),
    "resblock-3d": (lambda tmp: ckpt_dir(tmp, {
        **head_tensors(), "1.0.linear.weight": np.ones((2, HIDDEN, HIDDEN), np.float32)}),
        ("1.0.linear.weight", "[2, 8, 8]")),
    "head-index-1e9": (lambda tmp: ckpt_dir(tmp, {
        **head_tensors(), "1000000000.0.linear.weight": np.ones((HIDDEN, HIDDEN), np.float32)}),
        ("1000000000.0.linear.weight", "head")),
    "head-index-999999999": (lambda tmp: ckpt_dir(tmp, {
        **head_tensors(), "999999999.0.linear.weight": np.ones((HIDDEN, HIDDEN), np.float32)}),
        ("999999999.0.linear.weight", "at most 64 heads")),
    "head-index-5000-digits": (lambda tmp: ckpt_dir(tmp, {
        **head_tensors(), "7" * 5000 + ".0.linear.weight": np.ones((HIDDEN, HIDDEN), np.float32)}),
        ("at most 64 heads",)),
    "resblock-index-1e9": (lambda tmp: ckpt_dir(tmp, {
        **head_tensors(), "0.1000000000.linear.weight": np.ones((HIDDEN, HIDDEN), np.float32)}),
        ("0.1000000000.linear.weight", "ResBlock")),
    "head-index-leading-zero": (lambda tmp: ckpt_dir(tmp, {
        **head_tensors(), "00.0.linear.weight": np.ones((HIDDEN, HIDDEN), np.float32)}),
        ("'00.0.linear.weight'", "'0.0.linear.weight'", "both")),
    "resblocks-with-a-hole": (lambda tmp: ckpt_dir(tmp, {
        **{k: v for k, v in head_tensors().items() if not k.endswith(".1.weight")},
        "0.2.linear.weight": np.ones((HIDDEN, HIDDEN), np.float32),
        "0.3.weight": np.ones((VOCAB, HIDDEN), np.float32),
        "1.3.weight": np.ones((VOCAB, HIDDEN), np.float32)}),
        ("head 0", "ResBlock 1", "'0.1.linear.weight'", "[0, 2]")),
    "bias-without-weight": (lambda tmp: ckpt_dir(tmp, {
        **head_tensors(), "1.5.linear.bias": np.ones(HIDDEN, np.float32)}),
        ("1.5.linear.bias", "weight")),
    # --- what SRC is
    "src-dev-null": (lambda tmp: Path("/dev/null"), ("/dev/null", "neither a regular file")),
    "src-fifo": (lambda tmp: fifo(tmp / "weights.safetensors"),
                 ("weights.safetensors", "neither a regular file")),
    "src-dir-holding-a-fifo": (lambda tmp: fifo(tmp / "ckpt" / "model.safetensors").parent,
                               ("ckpt", "no weights found")),
    "src-missing": (lambda tmp: tmp / "nothing-here", ("nothing-here", "no such file")),
    "src-unknown-suffix": (lambda tmp: written(tmp / "w.gguf", b"GGUF"),
                           ("w.gguf", "unsupported weights file")),
    # --- shard indexes
    "index-weight-map-list": (lambda tmp: index_dir(tmp, ["model-00001.safetensors"]),
                              ("model.safetensors.index.json", "weight_map")),
    "index-weight-map-number": (lambda tmp: index_dir(tmp, {"0.1.weight": 5}),
                                ("model.safetensors.index.json", "weight_map['0.1.weight']")),
    "index-weight-map-empty": (lambda tmp: index_dir(tmp, {}),
                               ("model.safetensors.index.json", "weight_map")),
    "index-not-object": (lambda tmp: written(index_dir(tmp, {}) / "model.safetensors.index.json", b"[1]"),
                         ("model.safetensors.index.json", "weight_map")),
    "index-deep": (lambda tmp: written(index_dir(tmp, {}) / "model.safetensors.index.json", deep_json()),
                   ("model.safetensors.index.json", "nests too deep")),
    "index-shard-outside": (lambda tmp: index_dir(tmp, {"0.1.weight": "../elsewhere/x.safetensors"}),
                            ("model.safetensors.index.json", "../elsewhere/x.safetensors", "outside")),
    "index-shard-absolute": (lambda tmp: index_dir(tmp, {"0.1.weight": "/etc/passwd"}),
                             ("model.safetensors.index.json", "/etc/passwd", "outside")),
    "index-shard-missing": (lambda tmp: index_dir(tmp, {"0.1.weight": "gone.safetensors"}),
                            ("model.safetensors.index.json", "gone.safetensors", "missing")),
    "index-shard-is-a-directory": (
        lambda tmp: index_dir(tmp, {"0.1.weight": "sub"}) and (tmp / "ckpt" / "sub").mkdir()
        or tmp / "ckpt", ("model.safetensors.index.json", "sub")),
    "index-names-an-absent-tensor": (
        lambda tmp: index_dir(tmp, {**{n: "model-00001.safetensors" for n in head_tensors()},
                                    "2.1.weight": "model-00001.safetensors"}),
        ("model.safetensors.index.json", "'2.1.weight'", "in no shard")),
    # --- config.json (a hint, but read)
    "config-not-object": (lambda tmp: ckpt_dir(tmp, config="[1, 2]"), ("config.json", "object")),
    "config-deep": (lambda tmp: ckpt_dir(tmp, config=deep_json()), ("config.json", "nests too deep")),
    "config-not-utf8": (lambda tmp: written(ckpt_dir(tmp) / "config.json", b'{"\xff\xfe": 1}').parent,
                        ("config.json",)),
    "config-nan": (lambda tmp: ckpt_dir(tmp, config='{"vocab_size": NaN}'), ("config.json", "vocab_size", "an integer")),
    "config-original-lm-head-string": (
        lambda tmp: ckpt_dir(tmp, config={"original_lm_head": "yes"}),
        ("config.json", "original_lm_head")),
    # --- PyTorch zip archives
    "pt-stride-zero-4-bytes-as-4-tib": (lambda tmp: write_pt_records(
        tmp / "ckpt" / "heads.pt", np.ones(1, np.float32),
        [("0.0.linear.weight", 0, (1 << 16, 1 << 16), (0, 0)),
         ("0.1.weight", 0, (1 << 22, 1 << 16), (0, 0))]),
        ("heads.pt", "0.", "overlap")),
    "pt-strides-overlap": (lambda tmp: write_pt_records(
        tmp / "ckpt" / "heads.pt", np.ones(64, np.float32),
        [("0.0.linear.weight", 0, (16, 16), (1, 1))]),
        ("heads.pt", "'0.0.linear.weight'", "overlap")),
    "pt-view-past-storage": (lambda tmp: write_pt_records(
        tmp / "ckpt" / "heads.pt", np.ones(64, np.float32),
        [("0.0.linear.weight", 8, (8, 8), (8, 1))]),
        ("heads.pt", "'0.0.linear.weight'", "storage")),
    "pt-negative-offset": (lambda tmp: write_pt_records(
        tmp / "ckpt" / "heads.pt", np.ones(64, np.float32),
        [("0.0.linear.weight", -8, (8, 8), (8, 1))]),
        ("heads.pt", "offset")),
    "pt-negative-shape": (lambda tmp: write_pt_records(
        tmp / "ckpt" / "heads.pt", np.ones(64, np.float32),
        [("0.0.linear.weight", 0, (-8, 8), (8, 1))]),
        ("heads.pt", "shape")),
    "pt-shape-overflows-int64": (lambda tmp: write_pt_records(
        tmp / "ckpt" / "heads.pt", np.ones(64, np.float32),
        [("0.0.linear.weight", 0, (2**40, 2**40, 0), (1, 1, 1))]),
        ("heads.pt", "'0.0.linear.weight'", "too large")),
    "pt-member-declared-4-tib": (lambda tmp: _pt_member_size(tmp, 1 << 42),
                                 ("heads.pt", "archive/data/0", "past the end")),
    "pt-data-pkl-bomb": (lambda tmp: zip_bomb_pt(tmp, "archive/data.pkl"),
                         ("heads.pt", "data.pkl", "bytes")),
    "pt-byteorder-bomb": (lambda tmp: zip_bomb_pt(tmp, "archive/byteorder"),
                          ("heads.pt", "byteorder", "bytes")),
    "pt-crc-mismatch": (lambda tmp: _pt_corrupt_compressed(tmp), ("heads.pt", "corrupt")),
    "pt-truncated-compressed-member": (lambda tmp: _pt_truncated_member(tmp),
                                       ("heads.pt", "data.pkl")),
    "pt-compressed-member-cut-short": (lambda tmp: _pt_cut_short(tmp),
                                       ("heads.pt", "data.pkl", "corrupt: Bad CRC-32")),
    "pt-encrypted-member": (lambda tmp: _pt_encrypted(tmp), ("heads.pt", "encrypted")),
    "pt-unsupported-compression": (lambda tmp: _pt_compression(tmp, zipfile.ZIP_LZMA),
                                   ("heads.pt", "compression")),
    "pt-not-a-state-dict": (lambda tmp: pt_with_pickle(tmp / "ckpt" / "heads.pt",
                                                       pickle.dumps([1, 2, 3], protocol=2)),
                            ("heads.pt", "not a state dict")),
    "pt-persistent-id-of-a-number": (lambda tmp: pt_with_pickle(
        tmp / "ckpt" / "heads.pt", b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x05Qs."),
        ("heads.pt", "persistent id")),
    "pt-build-on-a-global": (lambda tmp: pt_with_pickle(
        tmp / "ckpt" / "heads.pt",
        b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x01sb."),
        ("heads.pt", "BUILD")),
    "pt-deep-nesting": (lambda tmp: pt_with_pickle(
        tmp / "ckpt" / "heads.pt", b"\x80\x02" + b"(" * DEEP + b"]" + b"l" * DEEP + b"."),
        ("heads.pt",)),
    "pt-two-data-pkl": (lambda tmp: pt_with_pickle(
        tmp / "ckpt" / "heads.pt", pickle.dumps({}, protocol=2),
        extra={"other/data.pkl": pickle.dumps({}, protocol=2)}),
        ("heads.pt", "data.pkl")),
    "pt-garbage": (lambda tmp: written(tmp / "ckpt" / "heads.pt", b"PK\x03\x04" + bytes(range(200))),
                   ("heads.pt", "zip")),
}


# --- packed directories, libraries, trees and .npy files -------------------------------------


def _compile(edit_config=None, edit_cache=None, replace: Callable[[Path], None] | None = None,
             tree: Callable[[Path], Path] | None = None) -> Callable:
    def args(tmp, base):
        params = params_copy(base, tmp, edit_config, edit_cache)
        if replace is not None:
            replace(params)
        extra = ["--tree", tree(tmp)] if tree is not None else []
        return ["compile", params, "-o", "OUT.so", *extra]
    return args


def _inspect_params(edit_config=None, edit_cache=None) -> Callable:
    return lambda tmp, base: ["inspect", params_copy(base, tmp, edit_config, edit_cache)]


def _verify(metadata=None, edit_config=None, edit_cache=None, inputs=None,
            replace: Callable[[Path], None] | None = None) -> Callable:
    def args(tmp, base):
        params = params_copy(base, tmp, edit_config, edit_cache)
        if replace is not None:
            replace(params)
        library = fake_library(tmp / "lib" / "heads.so", metadata)
        extra = ["--inputs", inputs(tmp)] if inputs is not None else []
        return ["verify", library, params, *extra]
    return args


def _run(inputs: Callable[[Path], Path], metadata=None, base_logits=None) -> Callable:
    def args(tmp, base):
        library = fake_library(tmp / "lib" / "heads.so", metadata)
        extra = ["--base-logits", base_logits(tmp)] if base_logits is not None else []
        return ["run", library, base["params"], "--inputs", inputs(tmp), "-o", "OUT.npz", *extra]
    return args


def _library(make: Callable[[Path], Path]) -> Callable:
    return lambda tmp, base: ["inspect", make(tmp)]


def _lib_meta(edit: Callable[[dict], None]) -> Callable:
    return _library(lambda tmp: fake_library(tmp / "heads.so", edited_metadata(edit)))


def _model_config(key: str, value) -> Callable[[dict], None]:
    return lambda data: data["model_config"].__setitem__(key, value)


def _shard0(key: str, value) -> Callable[[dict], None]:
    return lambda data: data["records"][0].__setitem__(key, value)


def _record0(key: str, value) -> Callable[[dict], None]:
    return lambda data: data["records"][0]["records"][0].__setitem__(key, value)


def _tree_file(content: str | bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / "tree.json"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path
    return make


def _npy(make: Callable[[Path], object]) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        path = tmp / "hidden.npy"
        made = make(path)
        if isinstance(made, np.ndarray):
            np.save(path, made, allow_pickle=True)
        return path
    return build


def _no_md5_and_a_flipped_byte(params: Path) -> None:
    cache = json.loads((params / "tensor-cache.json").read_text())
    cache["records"][0].pop("md5sum")
    (params / "tensor-cache.json").write_text(json.dumps(cache))
    shard = params / cache["records"][0]["dataPath"]
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))


def _shard_fifo(params: Path) -> None:
    shard = params / "params_shard_0.bin"
    shard.unlink()
    os.mkfifo(shard)


def _tree_metadata(data: dict) -> None:
    data["tree"] = {"name": "t", "topk": 2, "paths": [[0], [1]]}


def _huge_tree() -> str:
    """11,730 paths (the tree that took 587 MB): every path of ranks < 10 up to depth 4, and
    more of depth 5 than a tree needs."""
    paths = [[a] for a in range(10)] + [[a, b] for a in range(10) for b in range(10)]
    paths += [[a, b, c] for a in range(10) for b in range(10) for c in range(10)]
    paths += [[a, b, c, d] for a in range(10) for b in range(10) for c in range(10) for d in range(10)]
    paths += [[0, 0, 0, 0, e] for e in range(10)] + [[0, 0, 0, 1, e] for e in range(10)]
    paths += [[0, 0, 0, d, e] for d in range(2, 10) for e in range(10)][:11730 - len(paths)]
    return json.dumps(paths)


HIDDEN_OK = _npy(lambda path: np.ones((2, HIDDEN), np.float32))

OTHER_CASES: dict[str, Case] = {
    # --- convert's other inputs
    "convert-lm-head-dev-null": Case(convert(lambda tmp: ckpt_dir(tmp, {
        k: v for k, v in head_tensors().items() if not k.endswith(".1.weight")}), "--lm-head", "/dev/null"),
        ("/dev/null", "neither a regular file")),
    "convert-lm-head-fifo": Case(convert(lambda tmp: ckpt_dir(tmp), "--lm-head", "LMHEAD"),
                                 ("lm_head.safetensors", "neither a regular file")),
    "convert-output-dev-null": Case(lambda tmp, base: ["convert", ckpt_dir(tmp), "-o", "/dev/null"],
                                    ("-o /dev/null", "not a directory")),
    # --- numbers given as flags that size an allocation or seed a generator
    "verify-negative-seed": Case(lambda tmp, base: [*_verify()(tmp, base), "--seed", "-1"],
                                 ("--seed -1", "non-negative")),
    "verify-batch-of-a-billion": Case(lambda tmp, base: [*_verify()(tmp, base), "--batch", "1000000000"],
                                      ("--batch 1000000000", "between 1 and")),
    "example-negative-seed": Case(lambda tmp, base: ["example", "OUT", "--seed", "-3"],
                                  ("--seed -3", "non-negative")),
    # --- tensor values: convert reads them, inspect does not
    "convert-nonfinite-weights": Case(convert(lambda tmp: ckpt_dir(tmp, {
        **head_tensors(), "1.0.linear.bias": np.full(HIDDEN, np.nan, np.float32)})),
        ("1.0.linear.bias", "NaN")),
    # --- mlc-chat-config.json given to compile
    "mlc-config-negative-vocab": Case(_compile(_model_config("vocab_size", -16)),
                                      ("mlc-chat-config.json", "vocab_size")),
    "mlc-config-top-level-negative-vocab": Case(_compile(lambda d: d.__setitem__("vocab_size", -16)),
                                                ("mlc-chat-config.json", "vocab_size")),
    "mlc-config-model-config-list": Case(_compile(lambda d: d.__setitem__("model_config", [1])),
                                         ("mlc-chat-config.json", "model_config")),
    "mlc-config-model-config-missing": Case(_compile(lambda d: d.pop("model_config")),
                                            ("mlc-chat-config.json", "model_config")),
    "mlc-config-kwargs-number": Case(_compile(_model_config("kwargs", 5)),
                                     ("mlc-chat-config.json", "kwargs")),
    "mlc-config-hidden-huge": Case(_compile(_model_config("hidden_size", 10**12)),
                                   ("mlc-chat-config.json", "hidden_size")),
    "mlc-config-heads-bool": Case(_compile(_model_config("medusa_num_heads", True)),
                                  ("mlc-chat-config.json", "medusa_num_heads")),
    "mlc-config-batch-disagrees": Case(_compile(lambda d: d.__setitem__("max_batch_size", 4)),
                                       ("mlc-chat-config.json", "max_batch_size")),
    "mlc-config-quantization-unknown": Case(_compile(lambda d: d.__setitem__("quantization", "q9")),
                                            ("mlc-chat-config.json", "quantization")),
    "mlc-config-conv-template-number": Case(_compile(lambda d: d.__setitem__("conv_template", 5)),
                                            ("mlc-chat-config.json", "conv_template")),
    "mlc-config-not-object": Case(_compile(replace=lambda p: (p / "mlc-chat-config.json").write_text("[]")),
                                  ("mlc-chat-config.json", "object")),
    "mlc-config-deep": Case(_compile(replace=lambda p: (p / "mlc-chat-config.json").write_text(deep_json())),
                            ("mlc-chat-config.json", "nests too deep")),
    "mlc-config-source-list": Case(_compile(lambda d: d.__setitem__("medusa_cli", {"source": [1]})),
                                   ("mlc-chat-config.json", "source")),
    # --- tensor-cache.json
    "cache-data-path-outside": Case(_inspect_params(edit_cache=_shard0("dataPath", "../x.bin")),
                                    ("tensor-cache.json", "dataPath")),
    "cache-data-path-absolute": Case(_compile(edit_cache=_shard0("dataPath", "/etc/passwd")),
                                     ("tensor-cache.json", "dataPath")),
    "cache-negative-offset": Case(_compile(edit_cache=_record0("byteOffset", -4)),
                                  ("tensor-cache.json", "byteOffset")),
    "cache-negative-shape": Case(_compile(edit_cache=_record0("shape", [-8, -8])),
                                 ("tensor-cache.json", "shape")),
    "cache-overlap": Case(_compile(edit_cache=lambda d: d["records"][0]["records"][1].update(
        byteOffset=d["records"][0]["records"][0]["byteOffset"])), ("tensor-cache.json", "overlap")),
    "cache-records-not-list": Case(_inspect_params(edit_cache=lambda d: d.__setitem__("records", {})),
                                   ("tensor-cache.json", "records")),
    "cache-md5-not-hex": Case(_compile(edit_cache=_shard0("md5sum", "x" * 32)),
                              ("tensor-cache.json", "md5sum")),
    "cache-shard-size-huge": Case(_compile(edit_cache=_shard0("nbytes", 2**62)),
                                  ("params_shard_0.bin", "bytes")),
    "cache-shard-is-a-fifo": Case(_compile(replace=_shard_fifo), ("params_shard_0.bin",)),
    "cache-deep": Case(_compile(replace=lambda p: (p / "tensor-cache.json").write_text(deep_json())),
                       ("tensor-cache.json", "nests too deep")),
    # --- verify: integrity with holes, provenance edited
    "verify-md5-removed-and-byte-flipped": Case(_verify(replace=_no_md5_and_a_flipped_byte),
                                                ("params_shard_0.bin", "md5sum"), code=1),
    "verify-source-path-number": Case(_verify(edit_config=lambda d: d["medusa_cli"]["source"].__setitem__("path", 5)),
                                      ("mlc-chat-config.json", "path")),
    "verify-source-files-list": Case(_verify(edit_config=lambda d: d["medusa_cli"]["source"].__setitem__("files", [1])),
                                     ("mlc-chat-config.json", "files")),
    "verify-source-layout-object": Case(_verify(edit_config=lambda d: d["medusa_cli"]["source"].__setitem__("layout", {})),
                                        ("mlc-chat-config.json", "layout")),
    # --- a library's metadata (read from the file, never loaded)
    "lib-base64-garbage": Case(_library(lambda tmp: fake_library(tmp / "heads.so", raw=b"@@@@")),
                               ("heads.so", "metadata")),
    "lib-json-list": Case(_library(lambda tmp: fake_library(tmp / "heads.so", [1])),
                          ("heads.so", "JSON object")),
    "lib-json-deep": Case(_library(lambda tmp: fake_library(
        tmp / "heads.so", raw=base64.b64encode(deep_json().encode()))), ("heads.so", "metadata")),
    "lib-negative-vocab": Case(_lib_meta(_model_config("vocab_size", -1)), ("heads.so", "vocab_size")),
    "lib-hidden-zero": Case(_lib_meta(_model_config("hidden_size", 0)), ("heads.so", "hidden_size")),
    "lib-params-huge": Case(_lib_meta(lambda d: d["params"][0].__setitem__("shape", [10**12, 10**12])),
                            ("heads.so", "params")),
    "lib-params-renamed": Case(_lib_meta(lambda d: d["params"][0].__setitem__("name", "x")),
                               ("heads.so", "params")),
    "lib-cuda-arches-number": Case(_lib_meta(lambda d: d.__setitem__("cuda_arches", 5)),
                                   ("heads.so", "cuda_arches")),
    "lib-target-list": Case(_lib_meta(lambda d: d.__setitem__("target", [1])), ("heads.so", "target")),
    "lib-memory-usage-strings": Case(_lib_meta(lambda d: d.__setitem__("memory_usage", {"a": "b"})),
                                     ("heads.so", "memory_usage")),
    "lib-tree-topk-string": Case(_lib_meta(lambda d: d.__setitem__("tree", {"name": "t", "topk": "9", "paths": [[0]]})),
                                 ("heads.so", "tree")),
    "lib-tree-deep-paths": Case(_lib_meta(lambda d: d.__setitem__("tree", {"name": "t", "topk": 2, "paths": json.loads(
        deep_json("[", "]", 500))})), ("heads.so", "tree")),
    "lib-batch-disagrees": Case(_lib_meta(lambda d: d.__setitem__("max_batch_size", 4)),
                                ("heads.so", "max_batch_size")),
    "lib-without-marker": Case(_library(lambda tmp: written(tmp / "heads.so", b"\x7fELF" + b"\0" * 64)),
                               ("heads.so", "--load")),
    "lib-fifo": Case(_library(lambda tmp: fifo(tmp / "heads.so")), ("heads.so",)),
    "lib-tar-not-a-tar": Case(_library(lambda tmp: written(tmp / "heads.tar", b"x" * 1024)), ("heads.tar",)),
    "lib-verify-negative-vocab": Case(_verify(edited_metadata(_model_config("vocab_size", -1))),
                                      ("heads.so", "vocab_size")),
    "lib-run-params-mismatch": Case(_run(HIDDEN_OK, edited_metadata(
        lambda d: d["params"][0].__setitem__("dtype", "float16"))), ("heads.so", "params")),
    # --- tree JSON files
    "tree-deep": Case(lambda tmp, base: ["tree", _tree_file(deep_json("[", "]"))(tmp), "-o", "OUT.npz"],
                      ("tree.json", "nests too deep")),
    "tree-deep-object": Case(lambda tmp, base: ["tree", _tree_file(deep_json())(tmp), "-o", "OUT.npz"],
                             ("tree.json", "nests too deep")),
    "tree-11730-nodes": Case(lambda tmp, base: ["tree", _tree_file(_huge_tree())(tmp), "-o", "OUT.npz"],
                             ("tree.json", "nodes")),
    "tree-not-utf8": Case(lambda tmp, base: ["tree", _tree_file(b"[[0], \xff]")(tmp), "-o", "OUT.npz"],
                          ("tree.json",)),
    "tree-name-number": Case(lambda tmp, base: ["tree", _tree_file('{"name": 5, "paths": [[0]]}')(tmp),
                                                "-o", "OUT.npz"], ("tree.json", "name")),
    "tree-huge-rank": Case(lambda tmp, base: ["tree", _tree_file("[[" + "9" * 5000 + "]]")(tmp),
                                              "-o", "OUT.npz"], ("tree.json",)),
    "tree-topk-overflows-int32": Case(lambda tmp, base: ["tree", "mc_sim_7b_63", "--topk", "3000000000",
                                                         "-o", "OUT.npz"], ("--topk",)),
    "tree-fifo": Case(lambda tmp, base: ["tree", fifo(tmp / "tree.json"), "-o", "OUT.npz"],
                      ("tree.json", "not a regular file")),
    "compile-tree-deep": Case(_compile(tree=_tree_file(deep_json("[", "]"))),
                              ("tree.json", "nests too deep")),
    "compile-tree-11730-nodes": Case(_compile(tree=_tree_file(_huge_tree())), ("tree.json", "nodes")),
    # --- hidden states and base logits (.npy)
    "npy-object-array": Case(_run(_npy(lambda p: np.array([{"a": 1}, None], dtype=object))),
                             ("--inputs", "hidden.npy")),
    "npy-huge-shape": Case(_run(_npy(lambda p: npy_with_header(
        p, {"descr": "<f4", "fortran_order": False, "shape": (10**12, HIDDEN)}))),
        ("--inputs", "hidden.npy", "bytes")),
    "npy-shape-overflows-int64": Case(_run(_npy(lambda p: npy_with_header(
        p, {"descr": "<f4", "fortran_order": False, "shape": (2**40, 2**40)}))),
        ("--inputs", "hidden.npy")),
    "npy-negative-shape": Case(_run(_npy(lambda p: npy_with_header(
        p, {"descr": "<f4", "fortran_order": False, "shape": (-2, HIDDEN)}))),
        ("--inputs", "hidden.npy")),
    "npy-structured-dtype": Case(_run(_npy(lambda p: np.zeros((2, HIDDEN), dtype=[("a", "<f4")]))),
                                 ("--inputs", "hidden.npy", "dtype")),
    "npy-truncated": Case(_run(_npy(lambda p: npy_with_header(
        p, {"descr": "<f4", "fortran_order": False, "shape": (2, HIDDEN)}, b"\0" * 16))),
        ("--inputs", "hidden.npy")),
    "npy-int": Case(_run(_npy(lambda p: np.ones((2, HIDDEN), np.int32))), ("--inputs", "hidden.npy", "int32")),
    "npy-nan": Case(_run(_npy(lambda p: np.full((2, HIDDEN), np.nan, np.float32))),
                    ("--inputs", "hidden.npy", "NaN")),
    "npy-wrong-width": Case(_run(_npy(lambda p: np.ones((2, HIDDEN + 1), np.float32))),
                            ("--inputs", "hidden.npy", "shape")),
    "npy-zero-rows": Case(_run(_npy(lambda p: np.ones((0, HIDDEN), np.float32))),
                          ("--inputs", "hidden.npy", "shape")),
    "npy-npz": Case(_run(_npy(lambda p: written(p, zip_bytes([("a.npy", b"", 0)])))),
                    ("--inputs", "hidden.npy", "npz")),
    "npy-garbage": Case(_run(_npy(lambda p: p.write_bytes(b"\x93NUMPY\x09\x00garbage"))),
                        ("--inputs", "hidden.npy")),
    "npy-fifo": Case(_run(lambda tmp: fifo(tmp / "hidden.npy")), ("--inputs", "hidden.npy", "regular file")),
    "npy-verify-huge-shape": Case(_verify(inputs=_npy(lambda p: npy_with_header(
        p, {"descr": "<f4", "fortran_order": False, "shape": (10**12, HIDDEN)}))),
        ("--inputs", "hidden.npy", "bytes")),
    "base-logits-huge-shape": Case(_run(HIDDEN_OK, edited_metadata(_tree_metadata), lambda tmp: npy_with_header(
        tmp / "base.npy", {"descr": "<f4", "fortran_order": False, "shape": (10**12, VOCAB)})),
        ("--base-logits", "base.npy")),
    "base-logits-object-array": Case(_run(HIDDEN_OK, edited_metadata(_tree_metadata), lambda tmp: (
        np.save(tmp / "base.npy", np.array([None, 1], dtype=object), allow_pickle=True), tmp / "base.npy")[1]),
        ("--base-logits", "base.npy")),
}

CASES: dict[str, Case] = {
    **{f"{command}-{name}": case for name, (make, words) in CHECKPOINT_CASES.items()
       for command, case in both(make, words).items()},
    **OTHER_CASES,
}


# ---------------------------------------------------------------------------------------------
# the checks


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root with its kind, size and modification time."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            info = path.lstat()
            found[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return found


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_one_error_line_and_writes_nothing(name, tmp_path, base):
    case = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    args = [str(work / a) if isinstance(a, str) and a.startswith("OUT") else a
            for a in case.args(work, base)]
    if "LMHEAD" in args:  # a FIFO where a base model's weights file should be
        args[args.index("LMHEAD")] = fifo(work / "lm_head.safetensors")
    before = _snapshot(work)
    base_before = _snapshot(base["root"])
    result = _cli(*args)
    assert isinstance(result.exception, SystemExit) or result.exception is None, repr(result.exception)
    assert "Traceback" not in result.stderr
    assert result.exit_code == case.code, result.stderr
    line = _error_line(result)
    for word in case.words:
        assert word in line, line
    assert len(line) < 1500, f"an error line of {len(line)} characters"
    assert result.stdout == ""
    assert _snapshot(work) == before, "the command wrote or changed files"
    assert _snapshot(base["root"]) == base_before


def test_a_member_that_ends_early_says_so(tmp_path):
    """zipfile raises a bare EOFError when a compressed member's bytes end early (here: the file
    is cut short after it was opened); the message says what happened, never nothing."""
    from medusa_cli.checkpoint.pytorch import TorchCheckpoint
    from medusa_cli.errors import CheckpointError

    path = tmp_path / "heads.pt"
    tensors = {"0.0.linear.weight": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)}
    save_torch_checkpoint(tensors, path)
    members = _pt_members(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with TorchCheckpoint(path) as ckpt:
        with open(path, "r+b") as f:
            f.truncate(200)
        with pytest.raises(CheckpointError) as err:
            ckpt.get_tensor("0.0.linear.weight")
    message = str(err.value)
    assert "0.0.linear.weight" in message and str(path) in message
    assert not message.rstrip().endswith(":") and "its compressed data ends early" in message


def test_an_index_whose_shards_are_symlinks_into_a_cache_reads(tmp_path):
    """Shard names are judged as names: a Hugging Face cache snapshot links each file into
    blobs/, and converts; the same index naming '../blobs/...' is refused."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blob = write_st(blobs / "0123456789abcdef", head_tensors())
    snapshot.mkdir(parents=True)
    (snapshot / "model-00001.safetensors").symlink_to(os.path.relpath(blob, snapshot))
    index = {"weight_map": {name: "model-00001.safetensors" for name in head_tensors()}}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    result = _cli("convert", snapshot, "-o", tmp_path / "params", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["num_tensors"] == 3 * HEADS

    index = {"weight_map": {name: "../../blobs/0123456789abcdef" for name in head_tensors()}}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    result = _cli("convert", snapshot, "-o", tmp_path / "again")
    assert result.exit_code == 2 and "outside the index's folder" in _error_line(result)
    assert not (tmp_path / "again").exists()
