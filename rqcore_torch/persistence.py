"""Saving and loading a :class:`~rqcore_torch.PreservationHandle` without pickle.

One safetensors file holds the tensors (calibration statistics, the task statistics of a pre-pass,
each group's current basis with the ``C_t`` it was solved with, the window of task statistics
tracked online since the last refresh and the generator of its token subsample, ``W₀`` snapshots)
and a JSON
metadata string (format, version, configuration, layer names, kinds and shapes, step). Loading never
unpickles code; it checks the schema, then that the model has the same layers with the same shapes, and
says precisely what does not match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from rqcore_torch.calibration import CalibrationStatistics, _read_safetensors
from rqcore_torch.config import PreserveConfig
from rqcore_torch.targets import Target, resolve_targets

if TYPE_CHECKING:
    from rqcore_torch.handle import PreservationHandle

__all__ = ["load", "save_handle"]

HANDLE_FORMAT = "rqcore_torch.preservation"
HANDLE_VERSION = 1


def _layer_meta(t: Target) -> dict[str, Any]:
    return {
        "kind": t.kind,
        "d_in": t.d_in,
        "augmented": t.augmented,
        "shapes": {p: list(w.shape) for p, w, _, _ in t.gated},
    }


def save_handle(handle: PreservationHandle, path: str | Path) -> None:
    """Write ``handle`` to ``path`` (safetensors; see the module docstring).

    The ``C_t`` of the current bases and the online window are saved apart from the task statistics,
    so :func:`load` solves the same bases and the loaded handle tracks and refreshes as this one would.

    Parameters
    ----------
    handle : PreservationHandle
    path : str or Path
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    stats_t, stats_meta = handle.statistics.state_dict()
    tensors.update({f"stats/{k}": v for k, v in stats_t.items()})
    task_meta = online_meta = None
    # Three things, each restored to its place. The task statistics of a pre-pass (what a refresh
    # falls back to for a group the online window missed). The current bases with the C_t each was
    # solved with: after a refresh (FoLoRA's warm-up included) that C_t came from an online window
    # reset since, so neither of the others holds it; and installing the bases spares a solve. And
    # the online window in progress (mid-warm-up too), so the next refresh sees the same statistics
    # as without the save.
    task = handle.task_statistics
    online = handle._online_stats
    if online is not None and online.groups:
        online_t, online_meta = online.state_dict()
        tensors.update({f"online/{k}": v for k, v in online_t.items()})
    if handle._online is not None:  # the token subsample's draws continue after a load
        tensors["online_generator"] = handle._online.generator.get_state()
    for group, entry in handle._bases_state().items():  # the bases themselves, bit for bit
        tensors.update({f"bases/{group}/{k}": v.contiguous() for k, v in entry.items()})
    if task is not None and task.groups:
        task_t, task_meta = task.state_dict()
        tensors.update({f"task/{k}": v for k, v in task_t.items()})
    for name, w0 in handle._w0.items():
        tensors[f"w0/{name}"] = w0.detach().to("cpu").contiguous().clone()
    meta = {
        "format": HANDLE_FORMAT,
        "version": HANDLE_VERSION,
        "config": handle.config.to_json_dict(),
        "statistics": stats_meta,
        "task": task_meta,
        "online": online_meta,
        "layers": {t.name: _layer_meta(t) for t in handle.all_targets},
        "step": handle.step,
    }
    save_file(tensors, str(path), metadata={"rqcore": json.dumps(meta)})


def _check_schema(meta: dict[str, Any], path: Path) -> None:
    if meta.get("format") != HANDLE_FORMAT:
        raise ValueError(
            f"{path} holds {meta.get('format')!r}, not a preservation handle; calibration statistics "
            "load with rqcore_torch.CalibrationStatistics.load."
        )
    version = meta.get("version")
    if not isinstance(version, int) or version > HANDLE_VERSION:
        raise ValueError(
            f"{path}: format version {version!r} is not supported by this rqcore_torch "
            f"(<= {HANDLE_VERSION}); upgrade rqcore."
        )
    for key, kind in (("config", dict), ("statistics", dict), ("layers", dict), ("step", int)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{path}: metadata field {key!r} is missing or not a {kind.__name__}.")


def load(path: str | Path, model: nn.Module, **overrides: Any) -> PreservationHandle:
    """Rebuild a :class:`~rqcore_torch.PreservationHandle` for ``model`` from :meth:`~PreservationHandle.save`.

    Parameters
    ----------
    path : str or Path
    model : nn.Module
        A model with the same layer names and shapes as the saved one.
    **overrides
        Configuration fields to change (e.g. ``method="gate"``, or the callable ``gate=`` of the run).

    Returns
    -------
    PreservationHandle
        With the saved statistics, ``W₀`` snapshots and step count; its bases are re-solved from the
        ``C_t`` the saved bases were solved with (the same bases), and online tracking resumes from
        the saved window.

    Raises
    ------
    ValueError
        On a foreign or newer file, or a model whose layers differ (names, kinds or shapes are listed).
    FileNotFoundError
        If ``path`` does not exist.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> from rqcore_torch import load, preserve
    >>> model = nn.Linear(3, 2)
    >>> path = os.path.join(tempfile.mkdtemp(), "h.safetensors")
    >>> preserve(model, [torch.randn(6, 3)], progress=False).save(path)
    >>> load(path, model).config.method
    'folora'
    """
    from rqcore_torch.handle import PreservationHandle

    path = Path(path)
    tensors, meta = _read_safetensors(path)
    _check_schema(meta, path)
    config = PreserveConfig.from_json_dict(meta["config"], **overrides)
    saved: dict[str, dict[str, Any]] = meta["layers"]
    modules = dict(model.named_modules())
    problems = [f"{n}: missing from the model" for n in saved if n not in modules]
    if problems:
        raise ValueError(f"{path} does not match the model: " + "; ".join(problems) + ".")
    names = set(saved)
    targets = resolve_targets(model, lambda n, m: n in names)
    for t in targets:
        want = saved[t.name]
        have = _layer_meta(t)
        if want.get("kind") != have["kind"]:
            problems.append(f"{t.name}: saved as {want.get('kind')}, model has {have['kind']}")
        elif want.get("shapes") != have["shapes"]:
            problems.append(
                f"{t.name}: saved shapes {want.get('shapes')}, model has {have['shapes']}"
            )
        elif bool(want.get("augmented")) != have["augmented"]:
            problems.append(f"{t.name}: bias presence differs from the saved layer")
    if problems:
        raise ValueError(f"{path} does not match the model: " + "; ".join(problems) + ".")

    def section(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    stats = CalibrationStatistics.from_state_dict(section("stats/"), meta["statistics"])
    task = None
    if meta.get("task"):
        task = CalibrationStatistics.from_state_dict(section("task/"), meta["task"])
    by_name = {t.name: t for t in targets}
    for s in (stats, task):  # move each accumulator next to its layer's weight
        if s is None:
            continue
        for n, e in s.layers.items():
            if n == e.group and n in by_name:
                dev = by_name[n].gated[0][1].device
                if s.groups[n].device != dev:
                    s.groups[n] = type(s.groups[n]).from_state_dict(
                        s.groups[n].state_dict(), device=dev
                    )
    w0_t = section("w0/")
    w0 = {}
    for t in targets:
        if t.name in stats.layers:
            if t.name not in w0_t:
                raise ValueError(f"{path}: the W₀ snapshot of {t.name!r} is missing.")
            w0[t.name] = w0_t[t.name].to(t.gated[0][1].device)
    # Files written before the bases were saved have no "bases/" section: their bases are re-solved
    # from the task statistics, as before.
    bases: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in section("bases/").items():
        group, _, field = key.rpartition("/")
        bases.setdefault(group, {})[field] = value
    handle = PreservationHandle(
        model,
        config,
        targets,
        stats,
        task_statistics=task,
        w0=w0,
        step=int(meta["step"]),
        bases=bases,
    )
    if handle._online is not None and "online_generator" in tensors:
        handle._online.generator.set_state(tensors["online_generator"])
    if meta.get("online") and handle._online_stats is not None:
        # Continue the online C_t (warm-up or refresh window) where the saved run left it.
        online = CalibrationStatistics.from_state_dict(section("online/"), meta["online"])
        handle._load_online_state(
            {
                g: {k: torch.as_tensor(np.asarray(v)) for k, v in acc.state_dict().items()}
                for g, acc in online.groups.items()
            }
        )
    return handle
