"""Tensor dtypes by the names TVM, MLC-LLM's tensor cache and safetensors give them.

One table: every dtype a packed directory, a checkpoint or a library may hold, and its numpy
dtype (bfloat16 from ml_dtypes, which numpy lacks).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

# TVM's dtype name -> numpy dtype
NUMPY_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint32": np.dtype(np.uint32),
    "uint16": np.dtype(np.uint16),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}

# The dtypes Medusa head weights may come in (a checkpoint's floats).
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a dtype name; KeyError for a name outside the table."""
    return NUMPY_DTYPES[name]


def dtype_name(dtype: np.dtype) -> str:
    """TVM's name for a numpy dtype (ml_dtypes' bfloat16 included)."""
    return str(np.dtype(dtype))


def is_float(dtype: np.dtype) -> bool:
    """numpy floats and ml_dtypes' bfloat16 (whose kind numpy does not call "f")."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype == NUMPY_DTYPES["bfloat16"]


def to_float64(array: np.ndarray) -> np.ndarray:
    """float64 copy of a float array, bfloat16 included (exact)."""
    array = np.asarray(array)
    if array.dtype == NUMPY_DTYPES["bfloat16"]:
        array = array.astype(np.float32)
    return array.astype(np.float64)
