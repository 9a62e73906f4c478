"""The one BLAS call NumPy has no function for: a gemm that accumulates into its output.

``gemm_update(C, A, B, alpha=..., beta=...)`` computes C <- alpha A^T B + beta C in
place. NumPy's ``matmul`` always overwrites its output, so a weight step written with
it takes three calls and three passes over W (the product into a buffer, the decay,
the subtraction); the gemm reads and writes W within one call.

The gemm is the one inside NumPy's own OpenBLAS (the ILP64 ``cblas_?gemm64_`` that
NumPy's wheels ship), reached through ctypes: the same library, threads and thread
limits as every NumPy matmul, and no dependency beyond NumPy. Measured on this
project's machine (W 3072 x 50, batch 100, one thread): a whole training step of
``[50]`` takes 4-5% longer with NumPy's matmul and two passes than with this gemm
(median of paired rounds of 150 steps); SciPy's ``sgemm`` with beta (another
OpenBLAS build, with its own thread pool) took 0.30 s an epoch beyond the forward
matmul, where this gemm took 0.24 s and NumPy's three passes 0.33 s. Where the
symbol is absent (NumPy built against another BLAS) :data:`AVAILABLE` is False and
NumPy computes the same update in three passes.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
from typing import Any

import numpy as np

from model.errors import UsageError

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


# ILP64 (64-bit integer) CBLAS names: NumPy >= 2 wheels ship scipy-openblas, whose
# symbols carry a prefix and a suffix; NumPy 1.26 wheels ship OpenBLAS with the suffix.
_NAMES = ("scipy_cblas_{}gemm64_", "cblas_{}gemm64_")


def _load() -> dict[np.dtype, tuple[Any, type]]:
    for module in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            # dlsym on the extension module also searches the libraries it links.
            lib = ctypes.CDLL(importlib.import_module(module).__file__)
        except (ImportError, OSError, TypeError):  # pragma: no cover - another layout
            continue
        for name in _NAMES:
            try:
                sgemm, dgemm = getattr(lib, name.format("s")), getattr(lib, name.format("d"))
            except AttributeError:
                continue
            sgemm.restype = dgemm.restype = None
            return {
                np.dtype(np.float32): (sgemm, ctypes.c_float),
                np.dtype(np.float64): (dgemm, ctypes.c_double),
            }
    return {}  # pragma: no cover - NumPy built against another BLAS


_GEMM = _load()
AVAILABLE = bool(_GEMM)


def gemm_update(C: np.ndarray, A: np.ndarray, B: np.ndarray, *, alpha: float, beta: float) -> None:
    """C <- alpha A^T B + beta C in place. A: (N, d), B: (N, m), C: (d, m), one dtype.

    All three must be C-contiguous (``ValueError`` otherwise: BLAS would read the
    wrong numbers). Without the BLAS symbol (``AVAILABLE`` False) NumPy computes the
    same thing in three passes over C.
    """
    n, d = A.shape
    m = C.shape[1]
    if B.shape[0] != n or C.shape != (d, B.shape[1]):
        raise UsageError(f"shapes do not fit C = A^T B: A {A.shape}, B {B.shape}, C {C.shape}")
    if not (A.flags.c_contiguous and B.flags.c_contiguous and C.flags.c_contiguous):
        raise UsageError("gemm_update needs C-contiguous arrays; pass np.ascontiguousarray(...)")
    if not A.dtype == B.dtype == C.dtype:
        raise UsageError(f"one dtype for all, got {A.dtype}, {B.dtype}, {C.dtype}")
    entry = _GEMM.get(C.dtype)
    if entry is None:
        product = A.T @ B
        if beta != 1.0:
            C *= beta
        if alpha == -1.0:
            C -= product
        else:
            C += alpha * product
        return
    fn, scalar = entry
    # Row-major C (d, m) = alpha A^T (d, N) B (N, m) + beta C.
    fn(
        _ROW_MAJOR,
        _TRANS,
        _NO_TRANS,
        _int(d),
        _int(m),
        _int(n),
        scalar(alpha),
        _address(A),
        _int(d),
        _address(B),
        _int(m),
        scalar(beta),
        _address(C),
        _int(m),
    )


@functools.lru_cache(maxsize=256)
def _int(i: int) -> ctypes.c_int64:
    return ctypes.c_int64(i)


def _address(a: np.ndarray) -> Any:
    """A pointer to a's data for ctypes: ``byref`` on a view of its buffer (about
    1 us, where ``a.ctypes.data`` takes 2.5), which also keeps the buffer exported,
    so it cannot be reallocated during the call. Read-only arrays export no writable
    buffer and take the slower way."""
    if a.flags.writeable:
        # ndarray has the buffer protocol; NumPy's stubs do not say so to ctypes'.
        return ctypes.byref(ctypes.c_char.from_buffer(a))  # type: ignore[arg-type]
    return ctypes.c_void_p(a.ctypes.data)
