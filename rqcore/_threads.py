"""BLAS thread counts inside the iterative eigensolvers.

The drivers interleave a few large products (``A @ Z`` and the triangular solves with the Cholesky
factor: ``d × d`` times ``d × b``) with many small BLAS/LAPACK calls (Gram-Schmidt products against a
basis of a few hundred columns, QR of ``d × b`` blocks, ``eigh`` of the projected matrix). OpenBLAS
splits every call over all its threads; for the small calls the synchronization costs more than the
work (measured on 2 cores, d = 4096: ``eigh`` of a 128 × 128 matrix 1.5 → 6 ms, QR of a 4096 × 16 block
14 → 220 ms per run, the block Lanczos 1.4 → 2.1 s with 2 threads). So a driver runs its own calls on one
thread (:func:`driver_threads`) and gives the large products the caller's thread count back
(:func:`wide`). Below ``d = 2048`` even the large products and LAPACK's dense solvers ran slower on two
threads than on one (2 cores, 1 → 2 threads: ``scipy.linalg.eigh(A, B, subset_by_index)`` for k = 128
0.043 → 0.077 s at d = 512, 0.160 → 0.204 s at d = 1024, 1.07 → 0.66 s at d = 2048; a ``gemv`` at
d = 512 51 → 66 µs), so there :func:`wide` keeps one thread too. With one BLAS thread, or without
threadpoolctl, both are no-ops.

The thread count is process-wide: concurrent solves share it. The first solve to enter saves the
caller's counts and the last to leave restores them, so concurrent calls never leave the process with
a changed setting (they only see each other's count while both run).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

#: Matrices of this dimension or larger get the caller's thread count in :func:`wide`.
WIDE_MIN_DIM = 2048

_lock = threading.Lock()
_local = threading.local()
_libraries: list[Any] | None = None
_saved: list[int] = []
_depth = 0


def _blas_libraries() -> list[Any]:
    global _libraries
    if _libraries is None:
        try:
            from threadpoolctl import ThreadpoolController

            controller = ThreadpoolController()
            _libraries = [lib for lib in controller.lib_controllers if lib.user_api == "blas"]
        except Exception:  # pragma: no cover - threadpoolctl missing or unable to inspect
            _libraries = []
    return _libraries


@contextlib.contextmanager
def driver_threads(dim: int) -> Iterator[None]:
    """Run the enclosed driver on a ``dim × dim`` problem with single-threaded BLAS (restored on exit);
    inside it, :func:`wide` restores the caller's count when ``dim ≥ WIDE_MIN_DIM``."""
    global _depth, _saved
    outer_widen = getattr(_local, "widen", False)
    _local.widen = dim >= WIDE_MIN_DIM
    libraries = _blas_libraries()
    with _lock:
        if _depth == 0:
            _saved = [int(lib.get_num_threads()) for lib in libraries]
        _depth += 1
        narrow = any(n > 1 for n in _saved)
        if narrow:
            for lib in libraries:
                lib.set_num_threads(1)
    try:
        yield
    finally:
        _local.widen = outer_widen
        with _lock:
            _depth -= 1
            if _depth == 0 and narrow:
                for lib, n in zip(libraries, _saved, strict=True):
                    lib.set_num_threads(n)


@contextlib.contextmanager
def wide() -> Iterator[None]:
    """Inside :func:`driver_threads`: the caller's thread count for one large product."""
    if _depth == 0 or not getattr(_local, "widen", False) or not any(n > 1 for n in _saved):
        yield
        return
    libraries = _blas_libraries()
    for lib, n in zip(libraries, _saved, strict=True):
        lib.set_num_threads(n)
    try:
        yield
    finally:
        if _depth > 0:
            for lib in libraries:
                lib.set_num_threads(1)


def caller_threads() -> int:
    """The caller's BLAS thread count (outside any driver: the current setting)."""
    if _depth > 0:
        return max(_saved, default=1)
    return max((int(lib.get_num_threads()) for lib in _blas_libraries()), default=1)
