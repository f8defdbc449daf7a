"""BLAS thread counts inside the iterative eigensolvers.

The drivers interleave a few large products (``A @ Z`` and the triangular solves with the Cholesky
factor: ``d × d`` times ``d × b``) with many small BLAS/LAPACK calls (Gram-Schmidt products against a
basis of a few hundred columns, QR of ``d × b`` blocks, ``eigh`` of the projected matrix). OpenBLAS
splits every call over all its threads; for the small calls the synchronization costs more than the
work (measured on 2 cores, d = 4096: ``eigh`` of a 128 × 128 matrix 1.5 → 6 ms, QR of a 4096 × 16 block
14 → 220 ms per run, the block Lanczos 1.4 → 2.1 s with 2 threads). So a driver runs its own calls on one
thread (:func:`driver_threads`) and gives the large products the caller's thread count back
(:func:`wide`). With one BLAS thread, or without threadpoolctl, both are no-ops.

The thread count is process-wide: concurrent solves share it. The first solve to enter saves the
caller's counts and the last to leave restores them, so concurrent calls never leave the process with
a changed setting (they only see each other's count while both run).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

_lock = threading.Lock()
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
def driver_threads() -> Iterator[None]:
    """Run the enclosed driver with single-threaded BLAS (restored on exit)."""
    global _depth, _saved
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
        with _lock:
            _depth -= 1
            if _depth == 0 and narrow:
                for lib, n in zip(libraries, _saved, strict=True):
                    lib.set_num_threads(n)


@contextlib.contextmanager
def wide() -> Iterator[None]:
    """Inside :func:`driver_threads`: the caller's thread count for one large product."""
    if _depth == 0 or not any(n > 1 for n in _saved):
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
