"""Input statistics of the preserved layers: the calibration pass and online task tracking.

:func:`calibrate` runs a model over a loader with forward pre-hooks on the target layers and returns
:class:`CalibrationStatistics`: one :class:`~rqcore_torch.TorchCovariance` per *distinct* layer input (q/k/v
of an attention block see the same tensor and share one), kept on the activations' device. The
statistics are a plain object: saved with :meth:`CalibrationStatistics.save`, loaded with
:meth:`CalibrationStatistics.load`, continued by passing them back to :func:`calibrate` — statistics →
state dict → load as separate steps, so an expensive pass is done once.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rqcore.exceptions import RqcoreWarning
from rqcore_torch.statistics import TorchCovariance
from rqcore_torch.targets import Target, TargetSpec, functional_children, resolve_targets

__all__ = ["CalibrationStatistics", "calibrate"]

logger = logging.getLogger(__name__)

STATS_FORMAT = "rqcore_torch.calibration"
STATS_VERSION = 1
_SUMMED_KEYS = ("total_weight", "sum", "scatter", "third", "fourth", "count")

ForwardFn = Callable[[nn.Module, Any], Any]


@dataclass
class _LayerEntry:
    group: str  # name of the layer whose accumulator this layer shares (itself when it leads)
    dim: int


def _meta_count(value: Any, name: str) -> int:
    """A non-negative integer of the statistics metadata (bools and fractions are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name!r} must be an integer >= 0, got {value!r}")
    return int(value)


def _meta_names(value: Any, name: str) -> list[str]:
    """A list of layer names of the statistics metadata."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
        raise ValueError(f"{name!r} must be a list of layer names, got {value!r}")
    return list(value)


class CalibrationStatistics:
    """Uncentered second moments of the inputs of each target layer.

    Attributes
    ----------
    layers : dict of str to (group, dim)
        For each layer that the pass reached, the group (leader layer name) whose accumulator holds its
        statistics, and the statistics dimension (``d_in + 1`` when its bias is gated).
    groups : dict of str to TorchCovariance
        One accumulator per distinct input.
    batches, tokens : int
        Batches and (unmasked, before subsampling) tokens seen.
    unreached : list of str
        Target layers whose hook never fired (e.g. ``nn.MultiheadAttention.out_proj``).
    unmasked : list of str
        Layers whose input did not have the attention mask's ``(B, T)`` leading shape (not masked).
    mixed : bool
        True for the result of :meth:`weighted_merge` (or a calibration of a
        :func:`~rqcore_torch.mix`): its totals are normalized per source, so :func:`calibrate` does
        not continue it.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from rqcore_torch import calibrate
    >>> model = nn.Sequential(nn.Linear(3, 2))
    >>> stats = calibrate(model, [torch.ones(4, 3)], progress=False)
    >>> stats.covariance("0")
    tensor([[1., 1., 1., 1.],
            [1., 1., 1., 1.],
            [1., 1., 1., 1.],
            [1., 1., 1., 1.]], dtype=torch.float64)
    """

    def __init__(self) -> None:
        self.layers: dict[str, _LayerEntry] = {}
        self.groups: dict[str, TorchCovariance] = {}
        self.batches = 0
        self.tokens = 0
        self.unreached: list[str] = []
        self.unmasked: list[str] = []
        #: Built by :meth:`weighted_merge`: totals normalized per source, not continuable by calibrate.
        self.mixed = False

    def __repr__(self) -> str:
        return (
            f"CalibrationStatistics(layers={len(self.layers)}, groups={len(self.groups)}, "
            f"batches={self.batches}, tokens={self.tokens})"
        )

    def accumulator(self, name: str) -> TorchCovariance:
        """The accumulator holding layer ``name``'s statistics (shared within its group).

        Parameters
        ----------
        name : str
            A layer name of :attr:`layers`.

        Returns
        -------
        TorchCovariance
            The group's accumulator itself, not a copy: the layers of one group get the same object.

        Raises
        ------
        KeyError
            If the layer has no statistics (never reached, or not a target).
        """
        if name not in self.layers:
            raise KeyError(
                f"no statistics for layer {name!r}; layers with statistics: {sorted(self.layers)}."
            )
        return self.groups[self.layers[name].group]

    def covariance(self, name: str) -> torch.Tensor:
        """``Σ x xᵀ / n`` of layer ``name``'s (augmented) input, float64 on the statistics' device.

        Parameters
        ----------
        name : str
            A layer name of :attr:`layers`.

        Returns
        -------
        Tensor of shape (dim, dim)
            A fresh tensor, :meth:`TorchCovariance.covariance` of the layer's accumulator
            (``scatter / total_weight``; ``dim = d_in + 1`` when the bias is gated).

        Raises
        ------
        KeyError
            If the layer has no statistics.
        ValueError
            If its accumulator holds no data (zero total weight).
        """
        return self.accumulator(name).covariance()

    def nbytes(self) -> int:
        """Bytes held by the accumulators' float64 totals, computed from their sizes.

        Returns
        -------
        int
            ``Σ_groups 8·(D² + 2D) + 32`` with ``D`` the group's :attr:`TorchCovariance.dim`
            (``d_in + 1`` with a gated bias): the scatter, sum and third-moment arrays plus four
            scalars. Not a measurement of the memory allocated.
        """
        total = 0
        for acc in self.groups.values():
            D = acc.dim
            total += 8 * (D * D + 2 * D) + 32  # scatter, sum, third; 4 scalars
        return total

    # ------------------------------------------------------------------ state
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (CPU) and JSON-able metadata describing these statistics.

        Returns
        -------
        tensors : dict of str to Tensor
            ``"{group}::{key}"`` for every accumulator key of :meth:`TorchCovariance.state_dict`.
        meta : dict
            Format, version, layer → (group, dim), counters and notes.
        """
        tensors: dict[str, torch.Tensor] = {}
        for group, acc in self.groups.items():
            for key, value in acc.state_dict().items():
                tensors[f"{group}::{key}"] = torch.from_numpy(np.array(value, copy=True))
        meta = {
            "format": STATS_FORMAT,
            "version": STATS_VERSION,
            "layers": {n: [e.group, e.dim] for n, e in self.layers.items()},
            "batches": self.batches,
            "tokens": self.tokens,
            "unreached": list(self.unreached),
            "unmasked": list(self.unmasked),
            "mixed": self.mixed,
        }
        return tensors, meta

    @classmethod
    def from_state_dict(
        cls,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
        *,
        device: torch.device | str | None = None,
    ) -> CalibrationStatistics:
        """Rebuild from :meth:`state_dict` (validated: format, version, keys, shapes).

        Parameters
        ----------
        tensors : mapping of str to Tensor
            CPU tensors named ``"{group}::{key}"``, as :meth:`state_dict` returns them.
        meta : mapping
            The metadata of :meth:`state_dict`.
        device : torch.device or str, optional
            Where the accumulators live (default: the CPU).

        Returns
        -------
        CalibrationStatistics

        Raises
        ------
        ValueError
            On a foreign format, a newer version, malformed metadata, a group whose tensors are
            missing or invalid (checked by :meth:`TorchCovariance.from_state_dict`), or a layer
            whose declared dim differs from its group's.
        """
        if meta.get("format") != STATS_FORMAT:
            raise ValueError(f"not rqcore calibration statistics (format={meta.get('format')!r}).")
        if int(meta.get("version", -1)) > STATS_VERSION:
            raise ValueError(
                f"statistics format version {meta['version']} is newer than this rqcore_torch "
                f"({STATS_VERSION}); upgrade rqcore."
            )
        out = cls()
        try:
            layers = meta["layers"]
            if not isinstance(layers, Mapping):
                raise TypeError(f"'layers' must map layer names to [group, dim], got {layers!r}")
            out.layers = {
                n: _LayerEntry(str(g), _meta_count(d, "dim")) for n, (g, d) in layers.items()
            }
            out.batches = _meta_count(meta["batches"], "batches")
            out.tokens = _meta_count(meta["tokens"], "tokens")
            out.unreached = _meta_names(meta.get("unreached", []), "unreached")
            out.unmasked = _meta_names(meta.get("unmasked", []), "unmasked")
            out.mixed = bool(meta.get("mixed", False))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed statistics metadata: {exc!r}.") from None
        for group in sorted({e.group for e in out.layers.values()}):
            prefix = f"{group}::"
            state = {
                k[len(prefix) :]: v.numpy() for k, v in tensors.items() if k.startswith(prefix)
            }
            if not state:
                raise ValueError(f"the statistics of group {group!r} are missing from the file.")
            out.groups[group] = TorchCovariance.from_state_dict(state, device=device)
        for n, e in out.layers.items():
            if out.groups[e.group].dim != e.dim:
                raise ValueError(
                    f"layer {n!r} declares dim {e.dim} but its group holds {out.groups[e.group].dim}."
                )
        return out

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (tensors + JSON metadata; no pickle).

        The file holds :meth:`state_dict`: the tensors, and the metadata as JSON under the
        ``"rqcore"`` key. An existing file is overwritten.

        Parameters
        ----------
        path : str or Path
            The file to write.

        Examples
        --------
        >>> import tempfile, os, torch
        >>> from torch import nn
        >>> from rqcore_torch import calibrate, CalibrationStatistics
        >>> stats = calibrate(nn.Linear(3, 2), [torch.randn(5, 3)], progress=False)
        >>> path = os.path.join(tempfile.mkdtemp(), "stats.safetensors")
        >>> stats.save(path)
        >>> CalibrationStatistics.load(path).batches
        1
        """
        from safetensors.torch import save_file

        tensors, meta = self.state_dict()
        save_file(tensors, str(path), metadata={"rqcore": json.dumps(meta)})

    @classmethod
    def load(
        cls, path: str | Path, *, device: torch.device | str | None = None
    ) -> CalibrationStatistics:
        """Read statistics written by :meth:`save` onto ``device`` (default CPU).

        Parameters
        ----------
        path : str or Path
            A file written by :meth:`save`, or by :meth:`rqcore_torch.PreservationHandle.save`
            (whose calibration statistics are then read).
        device : torch.device or str, optional
            Where the accumulators live (default: the CPU).

        Returns
        -------
        CalibrationStatistics

        Raises
        ------
        FileNotFoundError
            If ``path`` is not a file.
        ValueError
            If the file is not a readable safetensors file with rqcore metadata, or the statistics
            fail the checks of :meth:`from_state_dict`.
        """
        tensors, meta = _read_safetensors(path)
        if "statistics" in meta and isinstance(meta["statistics"], dict):
            meta = meta["statistics"]
            tensors = {k[len("stats/") :]: v for k, v in tensors.items() if k.startswith("stats/")}
        return cls.from_state_dict(tensors, meta, device=device)

    # ------------------------------------------------------------------ combination
    @classmethod
    def weighted_merge(
        cls, parts: Sequence[tuple[CalibrationStatistics, float]]
    ) -> CalibrationStatistics:
        """Per group, the mixture ``Σ_s w_s C_s`` of normalized covariances.

        Each source's totals are rescaled to total weight ``w_s / max_s w_s`` (only the ratios
        matter) and summed, so the merged :meth:`covariance` is ``Σ_s w_s C_s / Σ_s w_s`` whatever
        the sources' token counts. The result is marked :attr:`mixed`: :func:`calibrate` refuses to
        add batches to it (they would outweigh the mix); merge new statistics in instead.

        Parameters
        ----------
        parts : sequence of (CalibrationStatistics, float)
            The sources and their weights ``w_s`` (finite, ``>= 0``, not all zero).

        Returns
        -------
        CalibrationStatistics
            New statistics (the sources are unchanged), on the devices of the first source's
            accumulators, with :attr:`mixed` set; ``batches`` and ``tokens`` are the sources' sums,
            ``unreached`` and ``unmasked`` the sorted unions of theirs.

        Raises
        ------
        ValueError
            If ``parts`` is empty, a weight is negative or not finite, all weights are zero, or the
            sources reached different layers or grouped them differently.

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> from rqcore_torch import calibrate
        >>> model = nn.Sequential(nn.Linear(2, 1, bias=False))
        >>> a = calibrate(model, [torch.tensor([[1.0, 0.0]])], progress=False)
        >>> b = calibrate(model, [torch.tensor([[0.0, 2.0]] * 3)], progress=False)  # 3 tokens
        >>> CalibrationStatistics.weighted_merge([(a, 1.0), (b, 1.0)]).covariance("0")
        tensor([[0.5000, 0.0000],
                [0.0000, 2.0000]], dtype=torch.float64)
        """
        parts = [(s, float(w)) for s, w in parts]
        if (
            not parts
            or any(w < 0 or not np.isfinite(w) for _, w in parts)
            or sum(w for _, w in parts) <= 0
        ):
            raise ValueError("weights must be finite, non-negative, and not all zero.")
        top = max(w for _, w in parts)
        parts = [
            (s, w / top) for s, w in parts
        ]  # only the ratios matter; their sum cannot overflow
        first = parts[0][0]
        layout = {n: (e.group, e.dim) for n, e in first.layers.items()}
        for s, _ in parts[1:]:
            if {n: (e.group, e.dim) for n, e in s.layers.items()} != layout:
                raise ValueError(
                    "the calibration sources reached different layers or grouped them differently; "
                    "pass share_inputs=False or check that every source runs the same model path."
                )
        out = cls()
        out.layers = {n: _LayerEntry(e.group, e.dim) for n, e in first.layers.items()}
        for group in first.groups:
            merged: dict[str, np.ndarray] | None = None
            for s, w in parts:
                state = s.groups[group].state_dict()
                tw = float(state["total_weight"])
                scale = w / tw if tw > 0 else 0.0
                if merged is None:
                    merged = dict(state)
                    for key in ("total_weight", "sum", "scatter", "third", "fourth"):
                        merged[key] = np.asarray(state[key], dtype=np.float64) * scale
                else:
                    for key in ("total_weight", "sum", "scatter", "third", "fourth"):
                        merged[key] = merged[key] + np.asarray(state[key], dtype=np.float64) * scale
                    merged["count"] = merged["count"] + state["count"]
            assert merged is not None
            device = first.groups[group].device
            out.groups[group] = TorchCovariance.from_state_dict(merged, device=device)
        out.batches = sum(s.batches for s, _ in parts)
        out.tokens = sum(s.tokens for s, _ in parts)
        out.unreached = sorted({n for s, _ in parts for n in s.unreached})
        out.unmasked = sorted({n for s, _ in parts for n in s.unmasked})
        out.mixed = True
        return out

    def all_reduce_(self) -> CalibrationStatistics:
        """Sum the sufficient statistics over ``torch.distributed`` ranks, in place.

        Uncentered totals add, so after the reduction every rank holds the statistics of the union
        of the ranks' shards (one float64 all-reduce per group, never raw activations).

        A collective: every rank of the initialized default process group must call it. ``batches``
        and ``tokens`` are summed too; ``unreached``, ``unmasked`` and ``mixed`` stay per rank.

        Returns
        -------
        CalibrationStatistics
            ``self``, reduced.

        Raises
        ------
        ValueError
            On every rank, if the ranks' accumulators differ in groups or dims (e.g. a rank whose
            shard was empty or reached other layers); nothing is reduced then.
        """
        import torch.distributed as dist

        # Every rank must reduce the same groups with the same sizes, in the same order: a mismatch
        # (ranks that reached other layers) would otherwise abort inside the collective.
        layout = sorted((g, acc.dim) for g, acc in self.groups.items())
        layouts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(layouts, layout)
        if any(other != layout for other in layouts):
            raise ValueError(
                "the ranks' calibration statistics differ in layers or sizes (e.g. a rank whose "
                "shard was empty, or whose batches reached other layers); every rank must run the "
                "same model path on a non-empty shard: "
                + "; ".join(f"rank {r}: {len(x)} groups" for r, x in enumerate(layouts))
                + "."
            )
        for group in sorted(self.groups):
            acc = self.groups[group]
            state = acc.state_dict()
            device = acc.device or torch.device("cpu")
            flat = torch.cat(
                [
                    torch.as_tensor(np.asarray(state[k], dtype=np.float64)).reshape(-1)
                    for k in _SUMMED_KEYS
                ]
            ).to(device)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            host = flat.cpu().numpy()
            offset = 0
            for k in _SUMMED_KEYS:
                size = int(np.asarray(state[k]).size)
                value = host[offset : offset + size].reshape(np.shape(state[k]))
                state[k] = value.astype(np.asarray(state[k]).dtype) if k == "count" else value
                offset += size
            state["count"] = np.array(round(float(state["count"])), dtype=np.int64)
            self.groups[group] = TorchCovariance.from_state_dict(state, device=device)
        counts = torch.tensor([self.batches, self.tokens], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            counts = counts.cuda()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        self.batches, self.tokens = (int(v) for v in counts.cpu().tolist())
        return self


def _read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("rqcore")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    if raw is None:
        raise ValueError(f"{path} has no rqcore metadata; was it written by rqcore_torch?")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt rqcore metadata ({exc}).") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: rqcore metadata must be a JSON object.")
    return tensors, meta


# ---------------------------------------------------------------------- the hook machinery
class _InputCollector:
    """Forward pre-hooks that feed target inputs into shared accumulators.

    Lives outside the user's modules: hooks are closures over this object, removed by :meth:`remove`.
    """

    def __init__(
        self,
        targets: Sequence[Target],
        stats: CalibrationStatistics,
        *,
        token_fraction: float = 1.0,
        seed: int | None = None,
        share_inputs: bool = True,
        active: Callable[[], bool] | None = None,
    ) -> None:
        self.targets = list(targets)
        self.stats = stats
        self.token_fraction = float(token_fraction)
        self.share_inputs = share_inputs
        self.active = active
        self.generator = torch.Generator()
        self.generator.manual_seed(0 if seed is None else int(seed))
        self.handles: list[Any] = []
        self.fired: set[str] = set()
        self.mask: torch.Tensor | None = None
        self.batch_index = 0
        self._forward_tokens = 0
        # group -> [(key, weakref to the consumed tensor)] within the current forward
        self._consumed: dict[str, list[tuple[tuple[Any, ...], Any]]] = {}
        self._unmasked: set[str] = set(stats.unmasked)

    def attach(self) -> None:
        for t in self.targets:
            self.handles.append(
                t.hook_module.register_forward_pre_hook(self._make_hook(t), with_kwargs=True)
            )

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def begin_batch(self, mask: torch.Tensor | None, index: int) -> None:
        self.mask = mask
        self.batch_index = index
        self._consumed.clear()
        self._forward_tokens = -1

    def end_batch(self) -> int:
        """Clear per-forward state; return the tokens of this forward (before subsampling)."""
        self._consumed.clear()
        self.mask = None
        tokens, self._forward_tokens = max(self._forward_tokens, 0), -1
        self.stats.unmasked = sorted(self._unmasked)
        return tokens

    def _make_hook(self, target: Target) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.active is not None and not self.active():
                return
            x = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(x, torch.Tensor):
                return
            self._consume(target, x)

        # Under torch.compile, Dynamo would trace this hook (and the accumulator's NumPy/BLAS calls
        # behind it) into the compiled graph and fail; run it eagerly, as a graph break.
        return torch.compiler.disable(hook)

    def _key(self, x: torch.Tensor, target: Target) -> tuple[Any, ...]:
        # The version counter tells an input changed in place between two layers (y = a(x);
        # x.relu_(); b(x)) from the same input shared by both.
        return (x.data_ptr(), x._version, tuple(x.shape), tuple(x.stride()), x.dtype, target.dim)

    def _match(self, key: tuple[Any, ...], group: str) -> bool:
        for k, ref in self._consumed.get(group, ()):
            if k == key and ref() is not None:  # alive: its memory cannot have been reused
                return True
        return False

    def _consume(self, target: Target, x: torch.Tensor) -> None:
        name = target.name
        self.fired.add(name)
        key = self._key(x, target)
        entry = self.stats.layers.get(name)
        if entry is None:
            group = name
            if self.share_inputs:
                for g in self._consumed:
                    if self._match(key, g):
                        group = g
                        break
            entry = _LayerEntry(group, target.dim)
            self.stats.layers[name] = entry
        group = entry.group
        if self.share_inputs and self._match(key, group):
            return  # the same tensor already went into this group's accumulator
        # Dead entries go: the root hook that clears the list per forward does not fire when a
        # training loop calls a child module directly, and the list would grow every step.
        alive = [(k, ref) for k, ref in self._consumed.get(group, ()) if ref() is not None]
        alive.append((key, weakref.ref(x)))
        self._consumed[group] = alive
        # Statistics never take part in backprop: during online tracking x comes from a training
        # forward and requires grad. The weak reference above stays on x itself (a detached alias
        # would die at once and break input sharing); only the rows are detached.
        rows = self._rows(target, x.detach())
        if self._forward_tokens < 0:
            self._forward_tokens = rows.shape[0]
        if self.token_fraction < 1.0 and rows.shape[0] > 0:
            n = rows.shape[0]
            m = max(1, round(n * self.token_fraction))
            idx = torch.randperm(n, generator=self.generator)[:m].sort().values
            rows = rows.index_select(0, idx.to(rows.device))
        if target.augmented:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        acc = self.stats.groups.get(group)
        if acc is None:
            acc = self.stats.groups[group] = TorchCovariance(target.dim, device=rows.device)
        if self.active is not None:
            # Online task statistics during training: a non-finite batch (which AMP's GradScaler
            # will skip anyway) is dropped on the device, without a host synchronization per step.
            acc.update(rows, check_finite=False)
            return
        try:
            acc.update(rows)
        except ValueError as exc:
            if "non-finite" in str(exc):
                raise ValueError(
                    f"non-finite activations (NaN/Inf) at the input of layer {name!r} in batch "
                    f"{self.batch_index}. This layer's statistics are unchanged, but layers earlier "
                    "in the same forward already include the batch: start the calibration again "
                    "(or from statistics saved before it) after fixing the model's numerics "
                    "(e.g. float16 overflow) or the batch's data."
                ) from None
            raise

    def _rows(self, target: Target, x: torch.Tensor) -> torch.Tensor:
        d = target.d_in
        if x.shape[-1] != d:
            raise ValueError(
                f"layer {target.name!r} expects {d} input features but its input has shape "
                f"{tuple(x.shape)}."
            )
        mask = self.mask
        if mask is not None:
            if x.ndim >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                return x[mask.to(x.device)].reshape(-1, d)
            if target.name not in self._unmasked:
                self._unmasked.add(target.name)
                logger.info(
                    "layer %s: input shape %s does not match the attention mask %s; not masked.",
                    target.name,
                    tuple(x.shape),
                    tuple(mask.shape),
                )
        return x.reshape(-1, d)


# ---------------------------------------------------------------------- running a loader
def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(
        batch, "_fields"
    ):  # a namedtuple takes fields, not one iterable
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def call_model(model: nn.Module, batch: Any, forward: ForwardFn | None) -> Any:
    """Run ``forward(model, batch)``, or ``model(**batch)`` / ``model(*batch)`` / ``model(batch)``."""
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    raise ValueError(
        f"cannot feed a batch of type {type(batch).__name__} to the model; batches must be dicts "
        "(model(**batch)), tuples/lists (model(*batch)) or tensors, or pass forward=lambda model, "
        "batch: ..."
    )


def _batch_mask(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            return mask.bool()
    return None


def _run_pass(
    model: nn.Module,
    loader: Iterable[Any],
    collector: _InputCollector,
    *,
    forward: ForwardFn | None,
    max_batches: int | None,
    skip_batches: int,
    progress: bool,
    desc: str,
) -> int:
    """Eval-mode, no-grad pass; returns batches run. Restores every module's training flag."""
    from tqdm.auto import tqdm

    flags = [(m, m.training) for m in model.modules()]
    device = _model_device(model)
    total = None
    if hasattr(loader, "__len__"):
        total = len(loader)  # type: ignore[arg-type]
        if max_batches is not None:
            total = min(total, max_batches)
    elif max_batches is not None:
        total = max_batches
    seen = 0
    start = time.perf_counter()
    tokens = 0
    bar = tqdm(total=total, desc=desc, unit="batch", disable=not progress, leave=False)
    model.eval()  # dropout would inflate the second moments
    try:
        with torch.no_grad():
            for index, batch in enumerate(loader):
                if max_batches is not None and index >= max_batches:
                    break
                if index < skip_batches:
                    bar.update(1)
                    continue
                batch = _to_device(batch, device)
                collector.begin_batch(_batch_mask(batch), index)
                call_model(model, batch, forward)
                tokens += collector.end_batch()
                seen += 1
                bar.update(1)
                rate = tokens / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(tokens_per_s=f"{rate:.3g}", refresh=False)
    finally:
        bar.close()
        for m, flag in flags:
            m.training = flag
    collector.stats.tokens += tokens
    return seen


def _restore(stats: CalibrationStatistics, snapshot: CalibrationStatistics) -> None:
    """Put ``stats`` back to ``snapshot`` in place (accumulators that existed keep their identity)."""
    groups = {}
    for name, saved in snapshot.groups.items():
        current = stats.groups.get(name)
        if current is None:
            groups[name] = saved
        else:
            current.__dict__.update(saved.__dict__)
            groups[name] = current
    stats.groups = groups
    stats.layers = snapshot.layers
    stats.batches, stats.tokens = snapshot.batches, snapshot.tokens
    stats.unreached, stats.unmasked = snapshot.unreached, snapshot.unmasked


def _check_reached(
    targets: Sequence[Target], stats: CalibrationStatistics, model: nn.Module
) -> None:
    missing = [t.name for t in targets if t.name not in stats.layers]
    stats.unreached = sorted(set(stats.unreached) | set(missing))
    if missing:
        functional = set(functional_children(model))
        notes = [
            f"{n} (called functionally by nn.MultiheadAttention)" if n in functional else n
            for n in missing
        ]
        warnings.warn(
            f"{len(missing)} target layer(s) never received an input during calibration and are not "
            f"preserved: {', '.join(notes)}. Their weights may still be used functionally; exclude "
            "them with targets=... or preserve them another way.",
            RqcoreWarning,
            stacklevel=3,
        )


def calibrate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    targets: TargetSpec | Sequence[Target] = None,
    forward: ForwardFn | None = None,
    max_batches: int | None = None,
    token_fraction: float = 1.0,
    share_inputs: bool = True,
    progress: bool = True,
    seed: int | None = None,
    statistics: CalibrationStatistics | None = None,
    skip_batches: int | None = None,
) -> CalibrationStatistics:
    """Collect the second moments of each target layer's input over a loader.

    Parameters
    ----------
    model : nn.Module
        Put in ``eval()`` for the pass; each module's own training flag is restored afterwards.
    loader : iterable of batches, or a CalibrationMix
        Batches are dicts (``model(**batch)``, an ``attention_mask`` excludes padding), tuples/lists
        (``model(*batch)``) or tensors (``model(batch)``). An object with ``.sources`` (pairs of loader
        and weight summing to 1, e.g. :class:`rqcore_torch.sampling.CalibrationMix`) is run source by
        source and merged as ``Σ_s w_s C_s`` (:meth:`CalibrationStatistics.weighted_merge`).
    targets : see :func:`~rqcore_torch.targets.resolve_targets`, or a list of Target
    forward : callable, optional
        ``forward(model, batch)`` overriding how a batch is fed.
    max_batches : int, optional
        Bound on the batches in the statistics (counting those of ``statistics`` when resuming).
    token_fraction : float, default 1.0
        Fraction of tokens kept per layer input (seeded ``torch.Generator``).
    share_inputs : bool, default True
        One accumulator for layers that receive the very same tensor in a forward (q/k/v).
    progress : bool, default True
        A tqdm bar with batches and tokens/s.
    seed : int, optional
        Seed of the token subsampling (None: 0).
    statistics : CalibrationStatistics, optional
        Continue these (e.g. loaded from a file) instead of starting afresh.
    skip_batches : int, optional
        Leading batches of ``loader`` to skip; default ``statistics.batches`` when resuming, so the
        same loader picks up where the saved pass stopped.

    Returns
    -------
    CalibrationStatistics

    Raises
    ------
    ValueError
        On an empty loader, an unknown batch type, non-finite activations (naming the layer and batch)
        or a bad ``token_fraction``. No hook stays attached.

    Warns
    -----
    RqcoreWarning
        Listing target layers that the pass never reached (e.g. ``nn.MultiheadAttention.out_proj``).

    Notes
    -----
    When ``torch.distributed`` is initialized, the totals are all-reduced after the pass (sums of an
    uncentered estimate add), so every rank ends with the statistics of all shards.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> stats = calibrate(model, [torch.randn(8, 4) for _ in range(3)], progress=False)
    >>> stats.batches, stats.tokens, sorted(stats.layers)
    (3, 24, ['0', '2'])
    """
    if not 0 < float(token_fraction) <= 1:
        raise ValueError(f"token_fraction must lie in (0, 1], got {token_fraction!r}.")
    resolved = (
        list(targets)
        if isinstance(targets, (list, tuple)) and targets and isinstance(targets[0], Target)
        else resolve_targets(model, targets)  # type: ignore[arg-type]
    )
    if hasattr(loader, "sources"):
        if statistics is not None:
            raise ValueError("resuming (statistics=...) is not supported for a mix of sources.")
        parts = []
        for i, (source, weight) in enumerate(loader.sources):
            part = calibrate(
                model,
                source,
                targets=resolved,
                forward=forward,
                max_batches=max_batches,
                token_fraction=token_fraction,
                share_inputs=share_inputs,
                progress=progress,
                seed=None if seed is None else seed + i,
            )
            parts.append((part, weight))
        return CalibrationStatistics.weighted_merge(parts)
    stats = statistics if statistics is not None else CalibrationStatistics()
    if stats.mixed:
        raise ValueError(
            "these statistics are a weighted mix (weighted_merge or mix): their totals are normalized "
            "per source, so further batches would outweigh the mix. Calibrate the new data into fresh "
            "statistics and merge them: CalibrationStatistics.weighted_merge([(mixed, w1), (new, w2)])."
        )
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if distributed and stats.batches > 0:
        # all_reduce_ sums whole totals: the already-reduced part would be counted world-size times.
        raise ValueError(
            "continuing a calibration under torch.distributed is not supported: the statistics "
            "passed in are already summed over ranks. Calibrate the remaining batches into fresh "
            "statistics and merge them, or run the whole pass in one call."
        )
    skip = stats.batches if skip_batches is None else int(skip_batches)
    # Statistics passed in are restored if the pass fails part-way (a non-finite batch, an error in
    # the model): the batches already added would otherwise count twice on the resume.
    snapshot = copy.deepcopy(stats) if statistics is not None else None
    collector = _InputCollector(
        resolved, stats, token_fraction=token_fraction, seed=seed, share_inputs=share_inputs
    )
    collector.attach()
    try:
        seen = _run_pass(
            model,
            loader,
            collector,
            forward=forward,
            max_batches=max_batches,
            skip_batches=skip,
            progress=progress,
            desc="rqcore calibration",
        )
    except BaseException:
        if snapshot is not None:
            _restore(stats, snapshot)
        raise
    finally:
        collector.remove()
    if seen == 0 and stats.batches == 0 and not distributed:
        raise ValueError(
            "the calibration loader yielded no batch; pass a non-empty iterable of batches "
            "(and check max_batches)."
        )
    stats.batches += seen
    if distributed:
        # A rank with an empty shard still joins the collective, so that every rank gets the same
        # clear error (from the layout check) instead of one raising and its peers losing the link.
        stats.all_reduce_()
        if stats.batches == 0:  # every shard was empty: the same error on every rank
            raise ValueError(
                "the calibration loaders of every rank yielded no batch; pass non-empty shards "
                "(and check max_batches)."
            )
    _check_reached(resolved, stats, model)
    logger.info(
        "calibration: %d batches, %d tokens, %d accumulators",
        stats.batches,
        stats.tokens,
        len(stats.groups),
    )
    return stats
