"""Load a compiled heads library with its parameters and run get_logits on numpy arrays.

    from medusa_cli.runtime import load_heads
    heads = load_heads("out/heads.so", "out/params", device="cuda:0")
    logits = heads.get_logits(hidden)        # hidden: [batch, hidden_size]
    # logits: one float32 [batch, vocab_size] array per head

    # a library compiled with --tree:
    tree_candidates, cart_candidates = heads.get_tree_candidates(base_logits, hidden)
    buffers = heads.get_tree_buffers()       # medusa_attn_mask, tree_indices, ...

CPU threads: TVM's runtime would use half the logical cores on x86 (it assumes
hyper-threading; one thread on a 2-vCPU machine) and pin the calling thread to one core, which
also slows numpy in the same process. Loading heads on the CPU sets TVM's (process-wide) pool to
every core this process may run on, unless `num_threads=` or the TVM_NUM_THREADS environment
variable says otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..devices import device_visible
from ..dtypes import NUMPY_DTYPES, is_float
from ..errors import InputError, ParamsError, error_gist
from ..library import SYSTEM_LIBRARY_SUFFIX, LibraryMetadata, read_library_metadata
from ..packed.check import check_packed
from ..packed.tensor_cache import load_array
from ..trees import TreeBuffers

# The CPUs this process may use, read before TVM's thread pool pins the main thread.
_PROCESS_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
    list(range(os.cpu_count() or 1))
# TVM's affinity mode that lets every worker thread run on any of the given CPUs.
_THREADS_SHARE_ALL_CPUS = -3


def configure_cpu_threads(num_threads: int | None = None) -> int:
    """Set TVM's CPU thread pool; None: $TVM_NUM_THREADS, else every CPU of this process."""
    import tvm

    if num_threads is None:
        env = os.environ.get("TVM_NUM_THREADS", "")
        num_threads = int(env) if env.isdigit() and int(env) > 0 else len(_PROCESS_CPUS)
    if num_threads < 1:
        raise InputError(f"num_threads must be at least 1, got {num_threads}")
    tvm.get_global_func("runtime.config_threadpool")(
        _THREADS_SHARE_ALL_CPUS, num_threads, [str(cpu) for cpu in _PROCESS_CPUS]
    )
    return num_threads


# Transparent huge pages: 2 MiB, asked for with madvise(MADV_HUGEPAGE) on Linux.
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def _param_tensor(array: np.ndarray, device):
    """`array` copied to `device`. On a Linux CPU, large tensors are first advised onto
    transparent huge pages (where the kernel's THP mode is "always" or "madvise"): every call
    streams all the weights, and 2 MiB pages spare a TLB miss per 4 KiB (measured on the
    vicuna-7b shape, interleaved: get_logits 3 to 8% faster)."""
    import tvm

    if (device.dlpack_device_type() != tvm.cpu().dlpack_device_type()
            or not os.uname().sysname == "Linux" or array.nbytes < 2 * _HUGE_PAGE):
        return tvm.runtime.tensor(array, device)
    tensor = tvm.runtime.empty(array.shape, str(array.dtype), device)
    _advise_huge_pages(tensor.data_ptr(), array.nbytes)  # before the pages are first touched
    tensor.copyfrom(array)
    return tensor


def _advise_huge_pages(address: int, nbytes: int) -> None:
    """madvise(MADV_HUGEPAGE) on the whole 2 MiB pages inside [address, address + nbytes); a
    refusal (old kernel, THP off) changes nothing, so it is not an error."""
    import ctypes

    start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    end = (address + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if end <= start:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass


def _parse_device(device: str, metadata: LibraryMetadata):
    """'cpu', 'cuda', 'cuda:1', 'rocm:0', 'auto' -> tvm Device that can run this library."""
    import tvm

    kind_of_library = metadata.target_kind
    name, _, index_text = device.partition(":")
    if name == "auto":
        name = "cpu" if kind_of_library == "llvm" else kind_of_library
    if index_text and not index_text.isdigit():
        raise InputError(f"--device {device!r}: expected a name and index such as cuda:0")
    index = int(index_text or 0)
    device_kind = "llvm" if name == "cpu" else name
    if device_kind != kind_of_library:
        raise InputError(
            f"--device {device}: the library was compiled for {kind_of_library}; use "
            f"--device {'cpu' if kind_of_library == 'llvm' else kind_of_library + ':0'} or "
            f"recompile with --target {name}"
        )
    if not device_visible(name, index):
        raise InputError(f"--device {device}: no such device is visible on this machine")
    return tvm.device(name, index)


@dataclasses.dataclass
class TreeTiming:
    """Median seconds per call of get_logits and get_tree_candidates, timed on the device."""

    batch: int
    # get_logits runs every head, get_tree_candidates only the tree's depth
    num_heads: int
    tree_depth: int
    get_logits: float
    get_tree_candidates: float

    @property
    def candidates_cost(self) -> float:
        """What get_tree_candidates adds to its heads (top-k of every row and the gathers):
        its time less that of `tree_depth` heads, taking every head to cost the same."""
        return self.get_tree_candidates - self.get_logits * self.tree_depth / self.num_heads

    def to_dict(self) -> dict:
        return {
            "batch": self.batch,
            "num_heads": self.num_heads,
            "tree_depth": self.tree_depth,
            "get_logits_ms": round(self.get_logits * 1e3, 4),
            "get_tree_candidates_ms": round(self.get_tree_candidates * 1e3, 4),
            "candidates_cost_ms": round(self.candidates_cost * 1e3, 4),
        }


class CompiledHeads:
    """A compiled heads library loaded on a device, with its packed parameters."""

    def __init__(self, lib_path: Path, params_dir: Path, device: str = "cpu",
                 num_threads: int | None = None):
        import tvm
        from tvm.runtime.vm import VirtualMachine  # relax.VirtualMachine; also in runtime-only TVM

        self.lib_path = Path(lib_path)
        self.params_dir = Path(params_dir)
        if self.lib_path.suffix == SYSTEM_LIBRARY_SUFFIX:
            raise InputError(
                f"{self.lib_path}: a .tar system library is for linking into an application; "
                "compile a .so (-o heads.so) to load it here"
            )
        self.metadata: LibraryMetadata = read_library_metadata(self.lib_path, load=True)
        self.config = self.metadata.config
        self.quantization: str = self.metadata.quantization
        self.max_batch_size: int = self.metadata.max_batch_size
        self.dtype: str = self.metadata.dtype
        # the tree of get_tree_candidates and its ranks per head; None without --tree
        library_tree = self.metadata.tree
        self.tree = None if library_tree is None else library_tree.tree
        self.topk = None if library_tree is None else library_tree.topk
        self.device = _parse_device(device, self.metadata)
        if self.device.dlpack_device_type() == tvm.cpu().dlpack_device_type():
            self.num_threads = configure_cpu_threads(num_threads)
        else:
            self.num_threads = None

        expected = self.metadata.params
        cache = check_packed(self.params_dir, expected, against="the library",
                             fix="pass the PARAMS_DIR this library was compiled from, or "
                                 "recompile it from this one")
        records = cache.by_name()
        try:
            module = tvm.runtime.load_module(str(self.lib_path))
            self._vm = VirtualMachine(module, self.device)
        except Exception as exc:
            raise InputError(f"{self.lib_path}: cannot load on {device} ({error_gist(exc)})") from None
        # Copied one tensor at a time from the memory-mapped shards, in the library's order.
        self._params = [
            _param_tensor(np.ascontiguousarray(load_array(self.params_dir, records[name])), self.device)
            for name, _, _ in expected
        ]
        self._get_logits = self._vm["get_logits"]

    @property
    def has_tree(self) -> bool:
        return self.tree is not None

    def get_logits(self, hidden: np.ndarray) -> list[np.ndarray]:
        """hidden [batch, hidden_size] (any float dtype, cast to the library's) -> per head
        float32 [batch, vocab_size]."""
        outputs = self._get_logits(self._device_hidden(hidden), self._params)
        return [out.numpy() for out in outputs]

    def logits_call(self, hidden: np.ndarray) -> Callable[[], list]:
        """A call of get_logits on `hidden`, put on the device once, that waits for the device
        and returns the logits where they are (device tensors): what `medusa bench` times, with
        no host transfers, which on a GPU would cost more than the heads."""
        device_hidden = self._device_hidden(hidden)

        def call() -> list:
            outputs = self._get_logits(device_hidden, self._params)
            self.device.sync()
            return list(outputs)

        return call

    def get_tree_candidates(self, base_logits: np.ndarray,
                            hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """base_logits [batch, vocab_size] (the base model's last position) and hidden
        [batch, hidden_size] -> (tree_candidates [batch, nodes], cart_candidates
        [batch, leaves, depth + 1]), int32, as tree.generate_candidates computes them."""
        import tvm

        self._require_tree("get_tree_candidates")
        device_hidden = self._device_hidden(hidden)
        base = np.asarray(base_logits)
        batch, vocab = device_hidden.shape[0], self.config.vocab_size
        if base.shape != (batch, vocab):
            raise InputError(
                f"base logits have shape {list(base.shape)}, expected [{batch}, {vocab}]: one row "
                "of the base model's logits per row of hidden states"
            )
        if not is_float(base.dtype):
            raise InputError(f"base logits have dtype {base.dtype}, expected a float array")
        base = np.ascontiguousarray(base.astype(np.float32, copy=False))
        function = self._vm["get_tree_candidates"]
        tree_candidates, cart_candidates = function(
            tvm.runtime.tensor(base, self.device), device_hidden, self._params
        )
        return tree_candidates.numpy(), cart_candidates.numpy()

    def get_tree_buffers(self) -> dict[str, np.ndarray]:
        """The tree's buffers stored in the library, under tree.TreeBuffers' names."""
        self._require_tree("get_tree_buffers")
        arrays = self._vm["get_tree_buffers"]()
        names = [field.name for field in dataclasses.fields(TreeBuffers)]
        return {name: array.numpy() for name, array in zip(names, arrays)}

    def time_tree_candidates(self, batch: int = 1, repeat: int = 10, seed: int = 0) -> TreeTiming:
        """Time get_logits and get_tree_candidates on random inputs, alternating `repeat` times
        (each sample at least 10 ms of calls); device time only, no numpy conversions."""
        import tvm

        self._require_tree("time_tree_candidates")
        if repeat < 1:
            raise InputError(f"repeat must be at least 1, got {repeat}")
        rng = np.random.default_rng(seed)
        hidden = self._device_hidden(rng.standard_normal((batch, self.config.hidden_size)))
        base = tvm.runtime.tensor(
            rng.standard_normal((batch, self.config.vocab_size)).astype(np.float32), self.device
        )
        logits_timer = self._vm.time_evaluator("get_logits", self.device, number=1, min_repeat_ms=10)
        tree_timer = self._vm.time_evaluator("get_tree_candidates", self.device, number=1,
                                             min_repeat_ms=10)
        logits_samples, tree_samples = [], []
        for _ in range(repeat):
            logits_samples.append(logits_timer(hidden, self._params).mean)
            tree_samples.append(tree_timer(base, hidden, self._params).mean)
        return TreeTiming(batch=batch, num_heads=self.config.medusa_num_heads,
                          tree_depth=self.tree.depth,
                          get_logits=float(statistics.median(logits_samples)),
                          get_tree_candidates=float(statistics.median(tree_samples)))

    def _require_tree(self, what: str) -> None:
        if not self.has_tree:
            raise InputError(
                f"{self.lib_path}: compiled without a tree, so it has no {what}; recompile with "
                "`medusa compile ... --tree mc_sim_7b_63` (or another tree)"
            )

    def _device_hidden(self, hidden: np.ndarray):
        """hidden [batch, hidden_size], checked and cast to the model dtype, on the device."""
        import tvm

        hidden = np.asarray(hidden)
        expected = f"[batch, {self.config.hidden_size}] with 1 <= batch <= {self.max_batch_size}"
        if hidden.ndim != 2 or hidden.shape[1] != self.config.hidden_size:
            raise InputError(f"hidden states have shape {list(hidden.shape)}, expected {expected}")
        if not 1 <= hidden.shape[0] <= self.max_batch_size:
            raise InputError(
                f"batch {hidden.shape[0]} is outside what {self.lib_path.name} was compiled for "
                f"({expected}); split the batch or recompile with --max-batch-size"
            )
        if not is_float(hidden.dtype):
            raise InputError(f"hidden states have dtype {hidden.dtype}, expected a float array")
        inputs = np.ascontiguousarray(hidden.astype(NUMPY_DTYPES[self.dtype], copy=False))
        return tvm.runtime.tensor(inputs, self.device)


def logits_in_batches(heads, hidden: np.ndarray) -> list[np.ndarray]:
    """heads.get_logits over hidden [batch, hidden] in slices of the library's max batch size;
    per head float32 [batch, vocab]."""
    step = heads.max_batch_size
    parts = [heads.get_logits(hidden[start:start + step]) for start in range(0, hidden.shape[0], step)]
    return [np.concatenate([part[h] for part in parts]) for h in range(len(parts[0]))]


def candidates_in_batches(heads, base_logits: np.ndarray, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """heads.get_tree_candidates in slices of the library's max batch size."""
    step = heads.max_batch_size
    parts = [heads.get_tree_candidates(base_logits[i:i + step], hidden[i:i + step])
             for i in range(0, hidden.shape[0], step)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_heads(lib_path: Path, params_dir: Path, device: str = "cpu",
               num_threads: int | None = None) -> CompiledHeads:
    """Load `lib_path` (from `medusa compile`) with the packed parameters in `params_dir`."""
    if not Path(params_dir).is_dir():
        raise ParamsError(f"{params_dir}: not a directory; pass the PARAMS_DIR the library was compiled from")
    return CompiledHeads(lib_path, params_dir, device=device, num_threads=num_threads)
