"""Torch re-expressions of rqcore's projectors, and the description of one gated layer.

:func:`to_torch` turns a core :class:`rqcore.RayleighBasis` or :class:`rqcore.NullspaceProjector` into a
:class:`TorchGate` that lives on one device in one dtype and gates ``(n, dim)`` row blocks in place. Both
maps share one factored form, ``P(D) = c·D + (D·A)·B`` with a scalar ``c``, ``A`` of shape ``(dim, k)``
and ``B`` of shape ``(k, dim)``, so one implementation serves both and
:class:`~rqcore_torch.optim.GatedOptimizer` can fuse the gate into its parameter update. The maths lives
in the core (``rqcore/projection.py``); ``tests/test_torch_projectors.py`` checks these gates equal it.

:class:`LayerGate` names the parameters of one layer together with the gate of its rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rqcore.projection import NullspaceProjector, RayleighBasis

__all__ = ["LayerGate", "TorchGate", "TorchNullspaceGate", "TorchRayleighGate", "to_torch"]

_GATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _as_tensor(arr: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # np.array(copy=True) first: the core's arrays may be read-only or shared with the basis.
    return torch.as_tensor(np.array(arr, dtype=np.float64, copy=True)).to(
        device=device, dtype=dtype
    )


def _check_representable(scale: float, left: torch.Tensor, right: torch.Tensor) -> None:
    """Raise if the factors or the scale overflowed the gate's dtype (checked once, when built).

    The core refuses gains that overflow a float32 ``G``; a gate cast to float16/bfloat16/float32
    would otherwise hold ``inf`` and gate every row to ``inf`` or NaN. One host synchronization here,
    none per step.
    """
    finite_scale = bool(torch.isfinite(torch.tensor(scale, dtype=left.dtype)))
    if not (
        finite_scale and bool(torch.isfinite(left).all()) and bool(torch.isfinite(right).all())
    ):
        raise ValueError(
            f"the gate's factors or its complement gain ({scale:.3g}) overflow {left.dtype}: the gains "
            f"are too large for it. Build the gate in a wider dtype (to_torch(..., dtype=torch.float32 "
            "or torch.float64)) or use smaller gains."
        )


class TorchGate:
    r"""A linear map of row blocks, ``P(D) = c·D + (D·A)·B``, held on one device in one dtype.

    The base class of :class:`TorchRayleighGate` and :class:`TorchNullspaceGate`; build those with
    :func:`to_torch`. Each row of ``D`` is a row of a weight update (augmented with the bias update when
    the layer has a bias), so ``dim`` is ``d_in`` or ``d_in + 1``.

    Parameters
    ----------
    scale : float
        ``c``, the gain of everything outside ``span(A)`` (the core's complement gain ``g⊥``).
    left : (dim, k) Tensor
        ``A`` (the dual basis ``M V`` of a Rayleigh basis; ``U`` of a null-space projector).
    right : (k, dim) Tensor
        ``B`` (``diag(g − g⊥)·Vᵀ``; ``−Uᵀ``), on ``left``'s device and in its dtype.

    Attributes
    ----------
    dim : int
        Row length it acts on.
    rank : int
        ``k``.
    device : torch.device
    dtype : torch.dtype

    Raises
    ------
    ValueError
        On inconsistent shapes, devices or dtypes, or a non-finite ``scale``.

    Notes
    -----
    The factors are read through :attr:`factors`; :meth:`apply_` costs two products of ``O(n·dim·k)``
    and, when ``c ∉ {0, 1}``, one scaling pass over the rows.
    """

    def __init__(self, scale: float, left: torch.Tensor, right: torch.Tensor) -> None:
        if left.ndim != 2 or right.ndim != 2 or right.shape != (left.shape[1], left.shape[0]):
            raise ValueError(
                f"left must be (dim, k) and right (k, dim); got {tuple(left.shape)} and "
                f"{tuple(right.shape)}."
            )
        if left.device != right.device or left.dtype != right.dtype:
            raise ValueError("left and right must share one device and dtype.")
        if left.dtype not in _GATE_DTYPES:
            raise ValueError(f"a gate needs a floating dtype, got {left.dtype}.")
        scale = float(scale)
        if not np.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale!r}.")
        _check_representable(scale, left, right)
        self._scale = scale
        self._left = left.contiguous()
        self._right = right.contiguous()
        self.dim: int = int(left.shape[0])
        self.rank: int = int(left.shape[1])

    @property
    def device(self) -> torch.device:
        """The device of the factors."""
        return self._left.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the factors."""
        return self._left.dtype

    @property
    def factors(self) -> tuple[float, torch.Tensor, torch.Tensor]:
        """``(c, A, B)`` with ``P(D) = c·D + (D·A)·B`` (the tensors themselves, not copies)."""
        return self._scale, self._left, self._right

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, rank={self.rank}, scale={self._scale:g}, "
            f"device={self.device}, dtype={self.dtype})"
        )

    def check_rows(self, rows: torch.Tensor, name: str = "rows") -> None:
        """Raise ValueError unless ``rows`` is an ``(n, dim)`` tensor on this gate's device and dtype.

        Parameters
        ----------
        rows : Tensor
        name : str, default "rows"
            Used in the message.

        Raises
        ------
        ValueError
            Naming the fix (reshape, or ``gate.to(device=..., dtype=...)``).
        """
        if not isinstance(rows, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(rows).__name__}.")
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(
                f"{name} must have shape (n, {self.dim}), got {tuple(rows.shape)}; a layer with a "
                "bias gates augmented rows [ΔW_i | Δb_i] of length d_in + 1."
            )
        if rows.device != self.device or rows.dtype != self.dtype:
            raise ValueError(
                f"{name} is on {rows.device} in {rows.dtype} but the gate is on {self.device} in "
                f"{self.dtype}; move the gate with gate.to(device={str(rows.device)!r}, "
                f"dtype={rows.dtype}) (or build it with to_torch(..., device=, dtype=))."
            )

    def apply_(self, rows: torch.Tensor) -> torch.Tensor:
        """Gate an ``(n, dim)`` block in place and return it.

        Parameters
        ----------
        rows : (n, dim) Tensor
            On the gate's device, in its dtype; any strides.

        Returns
        -------
        Tensor
            ``rows`` itself, now ``c·rows + (rows·A)·B``.

        Raises
        ------
        ValueError
            On a wrong shape, device or dtype (see :meth:`check_rows`).

        Notes
        -----
        The rows are not checked for NaN or Inf, which then propagate. A check would synchronize the host
        with the device on every call, and the optimizers' steps stay free of synchronization. AMP's
        ``GradScaler`` skips steps whose gradients are not finite. The core's ``apply`` checks, because
        it works on host arrays.

        Examples
        --------
        >>> import numpy as np, torch
        >>> from rqcore import NullspaceProjector
        >>> gate = to_torch(NullspaceProjector(np.diag([2.0, 1.0]), rank=1), dtype=torch.float64)
        >>> gate.apply_(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
        tensor([[0., 4.]], dtype=torch.float64)
        """
        self.check_rows(rows)
        if rows.shape[0] == 0 or self.rank == 0:
            return rows.mul_(self._scale) if self._scale != 1.0 else rows
        Z = rows @ self._left  # coordinates first: the next line overwrites rows
        # beta = 0 makes addmm ignore the old rows (also any NaN in them), as BLAS does for the core.
        rows.addmm_(Z, self._right, beta=self._scale)
        return rows

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TorchGate:
        """A gate with the same map on another device and/or dtype (``self`` when nothing changes).

        Parameters
        ----------
        device : torch.device or str, optional
        dtype : torch.dtype, optional

        Returns
        -------
        TorchGate
            Of the same class.
        """
        dev = self.device if device is None else torch.device(device)
        dt = self.dtype if dtype is None else dtype
        if dt not in _GATE_DTYPES:
            raise ValueError(
                f"a gate needs a floating dtype ({', '.join(map(str, _GATE_DTYPES))}), got {dt}."
            )
        if dev == self.device and dt == self.dtype:
            return self
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        for key, value in self.__dict__.items():
            if isinstance(value, torch.Tensor):
                other.__dict__[key] = value.to(device=dev, dtype=dt)
        _check_representable(other._scale, other._left, other._right)
        return other


class TorchRayleighGate(TorchGate):
    r"""The gate of a :class:`rqcore.RayleighBasis`: ``g⊥·G + (G·MV)·diag(g − g⊥)·Vᵀ``.

    Uses the basis's configured ``gains`` and ``complement`` (as :meth:`rqcore.RayleighBasis.apply`);
    build it with :func:`to_torch`.

    Parameters
    ----------
    basis : rqcore.RayleighBasis
    device : torch.device or str, optional
        Default: the CPU.
    dtype : torch.dtype, default torch.float32

    Attributes
    ----------
    V, MV : (dim, k) Tensor
        The basis and its dual on the device.
    gains : (k,) Tensor
    complement : float

    Notes
    -----
    ``diag(g − g⊥)·Vᵀ`` is formed once here (in float64, then cast), so a call costs the two products
    of the core's gate and no per-call scaling of the coordinates. A later ``basis.configure(...)`` does
    not reach this gate: convert the basis again.
    """

    def __init__(
        self,
        basis: RayleighBasis,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        dev = torch.device("cpu") if device is None else torch.device(device)
        gperp = float(basis.complement)
        scaled = (np.asarray(basis.gains, dtype=np.float64) - gperp)[:, None] * np.asarray(
            basis.vectors, dtype=np.float64
        ).T
        super().__init__(gperp, _as_tensor(basis.MV, dev, dtype), _as_tensor(scaled, dev, dtype))
        self.V = _as_tensor(basis.vectors, dev, dtype)
        self.MV = self._left
        self.gains = _as_tensor(basis.gains, dev, dtype)
        self.complement = gperp

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TorchGate:
        other = super().to(device, dtype)
        if isinstance(other, TorchRayleighGate):
            other.MV = other._left  # keep the alias: one tensor, not two copies
        return other

    to.__doc__ = TorchGate.to.__doc__


class TorchNullspaceGate(TorchGate):
    r"""The gate of a :class:`rqcore.NullspaceProjector`: ``G − (G·U)·Uᵀ``.

    Build it with :func:`to_torch`.

    Parameters
    ----------
    projector : rqcore.NullspaceProjector
    device : torch.device or str, optional
        Default: the CPU.
    dtype : torch.dtype, default torch.float32

    Attributes
    ----------
    U : (dim, r) Tensor
        The orthonormal directions removed from every row.

    Notes
    -----
    When more than half of the directions are removed (``r > (dim + 1)/2``) the gate is stored in the
    cheaper complement form ``G·Q·Qᵀ``, with ``Q`` an orthonormal basis of ``span(U)^⊥`` from a complete
    QR of ``U`` (float64): the same map with ``dim − r`` instead of ``r`` columns in both products.
    """

    def __init__(
        self,
        projector: NullspaceProjector,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        dev = torch.device("cpu") if device is None else torch.device(device)
        U64 = np.asarray(projector.basis, dtype=np.float64)
        dim, r = U64.shape
        U = _as_tensor(U64, dev, dtype)
        # c = 0 costs one more pass over the rows than c = 1: worth it once it saves > 1 column.
        if r > (dim + 1) / 2:
            Q = np.linalg.qr(U64, mode="complete")[0][:, r:]
            Qt = _as_tensor(Q, dev, dtype)
            super().__init__(0.0, Qt, Qt.T)
        else:
            super().__init__(1.0, U, -U.T)
        self.U = U

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TorchGate:
        return super().to(device, dtype)

    to.__doc__ = TorchGate.to.__doc__


def to_torch(
    projector: RayleighBasis | NullspaceProjector,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> TorchGate:
    """Re-express a core projector as a :class:`TorchGate` on ``device`` in ``dtype``.

    Parameters
    ----------
    projector : rqcore.RayleighBasis or rqcore.NullspaceProjector
        A Rayleigh basis gates with its configured ``gains`` and ``complement``.
    device : torch.device or str, optional
        Default: the CPU.
    dtype : torch.dtype, default torch.float32
        The dtype of the rows it will gate (float64 for exact comparisons with the core).

    Returns
    -------
    TorchGate
        A :class:`TorchRayleighGate` or a :class:`TorchNullspaceGate`.

    Raises
    ------
    TypeError
        For any other object.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from rqcore import RayleighBasis
    >>> basis = RayleighBasis.from_pencil(np.diag([2.0, 1.0, 0.5]), None, k=1, gains=0.5)
    >>> to_torch(basis, dtype=torch.float64).apply_(torch.ones(1, 3, dtype=torch.float64))
    tensor([[0.5000, 0.0000, 0.0000]], dtype=torch.float64)
    """
    if isinstance(projector, RayleighBasis):
        return TorchRayleighGate(projector, device=device, dtype=dtype)
    if isinstance(projector, NullspaceProjector):
        return TorchNullspaceGate(projector, device=device, dtype=dtype)
    raise TypeError(
        f"to_torch takes a rqcore.RayleighBasis or rqcore.NullspaceProjector, got "
        f"{type(projector).__name__}."
    )


@dataclass(frozen=True)
class LayerGate:
    """One layer's parameters and the gate of its update rows.

    Parameters
    ----------
    name : str
        Module name, for messages.
    weight : torch.nn.Parameter
        ``(d_out, d_in)``, or ``(d_in, d_out)`` when ``transposed``.
    bias : torch.nn.Parameter or None
        ``(d_out,)``. When given, row ``i`` of the update is ``[ΔW_i | Δb_i]`` (the layer's input is
        augmented to ``[x, 1]``), so the gate protects ``W x + b`` rather than ``W x``.
    gate : TorchGate
        With ``gate.dim == d_in + (1 if bias is not None else 0)``, on the parameters' device and
        in their dtype.
    transposed : bool, default False
        True for Hugging Face ``Conv1D`` (GPT-2), which stores the weight as ``(d_in, d_out)``.

    Raises
    ------
    ValueError
        On shape, device or dtype mismatches, naming the fix.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from rqcore import NullspaceProjector
    >>> layer = torch.nn.Linear(3, 2)
    >>> gate = to_torch(NullspaceProjector(np.eye(4), rank=1))
    >>> LayerGate("fc", layer.weight, layer.bias, gate).d_in
    3
    """

    name: str
    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None
    gate: TorchGate
    transposed: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.gate, TorchGate):
            raise ValueError(
                f"{self.name}: gate must be a TorchGate (use rqcore_torch.to_torch(projector)), "
                f"got {type(self.gate).__name__}."
            )
        w = self.weight
        if w.ndim != 2:
            raise ValueError(f"{self.name}: weight must be 2-D, got shape {tuple(w.shape)}.")
        d_out, d_in = (w.shape[1], w.shape[0]) if self.transposed else tuple(w.shape)
        expected = d_in + (0 if self.bias is None else 1)
        if self.gate.dim != expected:
            aug = " (d_in + 1: the bias augments the rows)" if self.bias is not None else ""
            layout = " with transposed=True" if self.transposed else ""
            raise ValueError(
                f"{self.name}: the gate acts on rows of length {self.gate.dim} but the layer{layout} "
                f"needs {expected}{aug}; build the projector from the layer's (augmented) input "
                "covariance, or set transposed=True for a Conv1D weight stored as (d_in, d_out)."
            )
        if self.bias is not None:
            if tuple(self.bias.shape) != (d_out,):
                raise ValueError(
                    f"{self.name}: bias has shape {tuple(self.bias.shape)}, expected ({d_out},)."
                )
            if self.bias.device != w.device or self.bias.dtype != w.dtype:
                raise ValueError(f"{self.name}: weight and bias must share one device and dtype.")
        if self.gate.device != w.device or self.gate.dtype != w.dtype:
            raise ValueError(
                f"{self.name}: the weight is on {w.device} in {w.dtype} but the gate is on "
                f"{self.gate.device} in {self.gate.dtype}; use gate.to(device={str(w.device)!r}, "
                f"dtype={w.dtype})."
            )

    @property
    def d_in(self) -> int:
        """Input dimension of the layer (without the bias augmentation)."""
        return int(self.weight.shape[0] if self.transposed else self.weight.shape[1])

    @property
    def d_out(self) -> int:
        """Output dimension of the layer: the number of update rows."""
        return int(self.weight.shape[1] if self.transposed else self.weight.shape[0])
