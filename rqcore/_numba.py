"""Numba configuration shared by every kernel module.

``njit`` compiles with ``cache=True`` so that compilation is paid once per machine. Numba stores its cache
beside the source (``__pycache__``) or, when that is not writable, in a user-wide directory
(``NUMBA_CACHE_DIR`` overrides both). On a read-only install where no location is writable, numba raises
at decoration time; we then compile without a cache instead of failing the import, and say so once in the
log. Set ``NUMBA_CACHE_DIR`` to a writable directory to get caching back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import numba

_F = TypeVar("_F", bound=Callable[..., Any])
_logger = logging.getLogger("rqcore")
_cache_disabled_noted = False


def njit(*, cache: bool = True, **options: Any) -> Callable[[_F], _F]:
    """``numba.njit`` with caching that falls back to no cache on read-only installs.

    Parameters
    ----------
    cache : bool, default True
        Try to cache the compiled machine code on disk.
    **options
        Further keyword arguments for :func:`numba.njit` (``fastmath``, ``parallel``...).

    Returns
    -------
    decorator : callable
        A decorator that returns the numba dispatcher.
    """

    def decorate(func: _F) -> _F:
        global _cache_disabled_noted
        if cache:
            try:
                return numba.njit(cache=True, **options)(func)
            except RuntimeError as exc:  # "cannot cache function ...: no locator available"
                if not _cache_disabled_noted:
                    _logger.info(
                        "numba cannot cache rqcore's kernels here (%s); compiling without a cache. "
                        "Set NUMBA_CACHE_DIR to a writable directory to enable caching.",
                        exc,
                    )
                    _cache_disabled_noted = True
        return numba.njit(cache=False, **options)(func)

    return decorate
