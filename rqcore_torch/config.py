"""Validated configuration of :func:`rqcore_torch.preserve`.

Every field is checked in ``__post_init__``; a bad value raises ValueError (TypeError for a wrong type)
whose message says what to pass instead, so a typo fails before any forward pass is spent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["GATES", "LORA_B_MODES", "LORA_INITS", "METHODS", "PreserveConfig"]

#: Methods :func:`rqcore_torch.preserve` understands; see ``docs/torch.md``.
METHODS = ("folora", "gate", "nullspace", "none")
#: Named gain functions of :mod:`rqcore.gates` usable as ``gate=``.
GATES = ("ratio", "hard", "threshold", "sigmoid", "power")
#: ``lora_init`` choices: re-initialize ``lora_A`` from the pencil's top eigenvectors, or keep PEFT's init.
LORA_INITS = ("basis", "keep")
#: ``lora_b`` choices: gate ``lora_B`` in the r-dimensional pencil, or train it with plain Adam.
LORA_B_MODES = ("pencil", "adam")


def _method_defaults(method: str) -> dict[str, float]:
    """The fields whose default depends on the method (FoLoRA regularizes more and keeps less)."""
    folora = method == "folora"
    return {"tau_fraction": 0.3 if folora else 0.9, "reg": 1e-1 if folora else 1e-4}


def _check_fraction(value: Any, name: str, *, closed_low: bool = False) -> float:
    x = _real(value, name)
    low_ok = x >= 0 if closed_low else x > 0
    if not (math.isfinite(x) and low_ok and x <= 1):
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}; e.g. {name}=0.25.")
    return x


def _check_optional_positive_int(value: Any, name: str, hint: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive integer or None, got {value!r}; {hint}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}; {hint}")
    return int(value)


def _real(value: Any, name: str) -> float:
    """``value`` as a float, or a TypeError naming the field (strings and bools are not numbers)."""
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}.") from None


@dataclass
class PreserveConfig:
    """Configuration of a preservation run (what :func:`~rqcore_torch.preserve` builds from its kwargs).

    Parameters
    ----------
    method : {"folora", "gate", "nullspace", "none"}, default "folora"
        ``"folora"``: FoLoRA, Adam with its moments kept per spectral direction of each layer's pencil
        ``(C_t, C_p + εI)`` and each direction's step scaled by ``λ/(λ+τ)``
        (:class:`rqcore_torch.FoLoRAAdam`; ``docs/folora.md``); it replaces the optimizer.
        ``"gate"``: gate each step of any optimizer in the Rayleigh basis of the pencil ``(C_t, C_p)``.
        ``"nullspace"``: Adam-NSCL baseline, project the step off ``C_p``'s top-energy directions.
        ``"none"``: statistics and monitoring only (the wrapped optimizer does not gate).
    rank : int, optional
        Number of generalized eigenvectors per layer (None: the full basis, ``k = d``).
    gate : str or callable, default "ratio"
        Gain rule of ``method="gate"``: one of :data:`GATES` or a function ``values -> gains``.
    tau : "auto" or float, default "auto"
        Scale of the ratio/threshold/sigmoid gates. ``"auto"`` picks, at every refresh,
        ``rqcore.gates.tau_for_utility_fraction(values, tau_fraction)``.
    tau_fraction : float, optional
        Utility fraction kept by ``tau="auto"`` (strictly between 0 and 1). Default: 0.3 for
        ``"folora"`` (the toy ablation's winner: Adam spends penalty evenly over directions, so it needs
        a stronger gate), 0.9 for ``"gate"``.
    gate_options : mapping, optional
        Extra keyword arguments of the gate function: ``{"rank": r}`` for ``"hard"`` (required),
        ``{"temperature": t}`` for ``"sigmoid"`` (default 0.5; ``t = 1`` is the ``"ratio"`` gain),
        ``{"alpha": a}`` for ``"power"`` (default 1). An option the gate does not take raises
        ValueError.
    complement : float, default 0.0
        Gain of the complement of the kept ``rank`` directions (irrelevant for a full basis).
    reg : float, optional
        Relative regularization of ``C_p`` (``ε = reg · tr(C_p)/d``). Default: 1e-1 for ``"folora"``
        (transformer activations are strongly anisotropic: with 1e-2 the directions ``C_p`` barely uses
        get up to 10× AdamW's step in weight units and the finetune diverges at lrs AdamW tolerates;
        ``docs/folora.md`` §9), 1e-4 otherwise.
    energy : float, default 0.99
        Energy fraction of ``C_p`` blocked by ``method="nullspace"``.
    refresh_every : int, optional
        Re-solve the pencils every this many optimizer steps from the task statistics tracked online
        (None: never; ignored by ``"nullspace"`` and ``"none"``).
    task_token_fraction : float, default 0.25
        Fraction of training tokens that enter the online task statistics (compute budget).
    task_warmup : int, optional, default 10
        ``"folora"`` without task statistics (no ``task_loader``): track ``C_t`` online during the first
        ``task_warmup`` steps and re-solve the bases then, so the isotropic placeholder ``C_t`` is
        replaced early (None: wait for ``refresh_every``). Ignored when a ``task_loader`` was given.
    task_window : int, optional
        Track task statistics only during the last ``task_window`` optimizer steps before each refresh
        (None: all steps).
    max_batches : int, optional
        Bound on the calibration pass (and on the task pre-pass).
    token_fraction : float, default 1.0
        Fraction of calibration tokens used (seeded subsample).
    share_inputs : bool, default True
        Layers fed the very same input tensor (q/k/v) share one accumulator.
    progress : bool, default True
        Show a tqdm bar during calibration.
    seed : int, optional
        Seed of token subsampling.
    lora_init : {"basis", "keep"}, default "basis"
        ``"folora"`` on PEFT LoRA targets: ``"basis"`` re-initializes each trainable ``lora_A`` once, in
        :func:`~rqcore_torch.preserve` (before any training step), with the top-``r`` generalized
        eigenvectors of its layer's pencil, every row rescaled to the RMS row norm of PEFT's init (so
        ``lora_B``'s effective learning rate is unchanged). An adapter whose ``lora_B`` is already nonzero
        (trained) is left alone. Without a ``task_loader`` the pencil's ``C_t`` is then the isotropic
        placeholder, so the rows are the directions the calibration data uses least (cheap in penalty:
        ``lora_B`` can move along them without forgetting). ``"keep"``: PEFT's random init.
    lora_b : {"adam", "pencil"}, default "adam"
        ``"folora"`` on PEFT LoRA targets: ``"pencil"`` gates ``lora_B`` in the r-dimensional pencil
        ``(L_A C_t L_Aᵀ, L_A (C_p + εI) L_Aᵀ)`` (its inputs are ``L_A x``); ``"adam"``: plain Adam, the
        default because, with ``lora_A`` gated and started in the basis, gating ``lora_B`` too cost T
        accuracy without protecting P any better in the transformer experiment, and tied in the toy
        (``docs/folora.md`` §3).
    lora_b_tau : {"rank", "layer"}, default "rank"
        ``τ`` of ``lora_B``'s gate: ``"layer"`` the layer's own ``τ`` (the r-dim ``λ`` are the layer's
        Rayleigh quotients, so a direction gets the same gain through ``L_A`` or ``L_B``); ``"rank"``
        the ``tau`` rule applied to the ``r`` values (the toy's setting; each won one of the two
        transformer comparisons, ``docs/folora.md`` §3).
    lora_refresh_every : int, optional, default 25
        Re-solve the ``lora_B`` pencils from the current ``lora_A`` every this many steps (None: only
        when the handle re-solves its pencils — the warm-up and ``refresh_every`` refreshes, which always
        re-solve them with the new ``C_t``).

    Raises
    ------
    ValueError
        On an unknown method or gate, out-of-range numbers, or ``gate="hard"`` without
        ``gate_options={"rank": r}``; the message names the remedy.
    TypeError
        On a value of the wrong type (a string or bool for a number, a float for an integer).

    Examples
    --------
    >>> PreserveConfig(method="nullspace", energy=0.95).energy
    0.95
    >>> PreserveConfig(method="sgd")
    Traceback (most recent call last):
    ...
    ValueError: method must be one of ('folora', 'gate', 'nullspace', 'none'), got 'sgd'; use method="folora" (gated Adam, the default), "gate" (spectral gate of any optimizer) or "nullspace" (Adam-NSCL baseline).
    """

    method: str = "folora"
    rank: int | None = None
    gate: str | Callable[[np.ndarray], Any] = "ratio"
    tau: str | float = "auto"
    tau_fraction: float | None = None
    gate_options: Mapping[str, Any] = field(default_factory=dict)
    complement: float = 0.0
    reg: float | None = None
    energy: float = 0.99
    refresh_every: int | None = None
    task_token_fraction: float = 0.25
    task_warmup: int | None = 10
    task_window: int | None = None
    max_batches: int | None = None
    token_fraction: float = 1.0
    share_inputs: bool = True
    progress: bool = True
    seed: int | None = None
    lora_init: str = "basis"
    lora_b: str = "adam"
    lora_b_tau: str = "rank"
    lora_refresh_every: int | None = 25

    def __post_init__(self) -> None:
        for name in ("method", "lora_init", "lora_b", "lora_b_tau"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {getattr(self, name)!r}.")
        if not callable(self.gate) and not isinstance(self.gate, str):
            raise TypeError(f"gate must be a string or a callable, got {self.gate!r}.")
        for name in ("share_inputs", "progress"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")
            setattr(self, name, bool(getattr(self, name)))
        if self.method not in METHODS:
            raise ValueError(
                f'method must be one of {METHODS}, got {self.method!r}; use method="folora" '
                '(gated Adam, the default), "gate" (spectral gate of any optimizer) or '
                '"nullspace" (Adam-NSCL baseline).'
            )
        if not callable(self.gate) and self.gate not in GATES:
            raise ValueError(
                f"gate must be one of {GATES} or a callable values -> gains, got {self.gate!r}."
            )
        if isinstance(self.tau, str):
            if self.tau != "auto":
                raise ValueError(f"tau must be 'auto' or a positive float, got {self.tau!r}.")
        else:
            t = _real(self.tau, "tau")
            if not (math.isfinite(t) and t > 0):
                raise ValueError(f"tau must be 'auto' or a finite float > 0, got {self.tau!r}.")
            self.tau = t
        defaults = _method_defaults(self.method)
        if self.tau_fraction is None:
            self.tau_fraction = defaults["tau_fraction"]
        if self.reg is None:
            self.reg = defaults["reg"]
        p = _real(self.tau_fraction, "tau_fraction")
        if not (math.isfinite(p) and 0 < p < 1):
            raise ValueError(
                f"tau_fraction must lie strictly in (0, 1), got {self.tau_fraction!r}."
            )
        self.tau_fraction = p
        if self.gate_options is None:
            self.gate_options = {}
        if not isinstance(self.gate_options, Mapping):
            raise TypeError(
                f"gate_options must be a mapping such as {{'temperature': 0.5}}, got "
                f"{self.gate_options!r}."
            )
        # Plain Python numbers: the configuration is saved as JSON (numpy scalars are not).
        self.gate_options = {
            str(k): v.item() if isinstance(v, np.generic) else v
            for k, v in self.gate_options.items()
        }
        for key, value in self.gate_options.items():
            if key == "rank" and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"gate_options['rank'] must be an int, got {value!r}.")
            if key == "rank" and value < 1:
                raise ValueError(
                    f"gate_options['rank'] must be >= 1 (the directions kept), got {value}."
                )
            if key != "rank" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"gate_options[{key!r}] must be a number, got {value!r}.")
        if self.gate == "hard" and "rank" not in self.gate_options:
            raise ValueError(
                'gate="hard" needs the number of directions to keep: pass gate_options={"rank": r}.'
            )
        self.rank = _check_optional_positive_int(
            self.rank, "rank", "pass rank=None for the full basis."
        )
        c = _real(self.complement, "complement")
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"complement must be a finite gain >= 0, got {self.complement!r}.")
        self.complement = c
        r = _real(self.reg, "reg")
        if not math.isfinite(r) or r < 0:
            raise ValueError(f"reg must be a finite number >= 0 (e.g. 1e-4), got {self.reg!r}.")
        self.reg = r
        self.energy = _check_fraction(self.energy, "energy")
        self.refresh_every = _check_optional_positive_int(
            self.refresh_every, "refresh_every", "e.g. refresh_every=100, or None to never refresh."
        )
        self.task_token_fraction = _check_fraction(self.task_token_fraction, "task_token_fraction")
        self.task_warmup = _check_optional_positive_int(
            self.task_warmup,
            "task_warmup",
            "e.g. task_warmup=10, or None to wait for refresh_every.",
        )
        self.task_window = _check_optional_positive_int(
            self.task_window, "task_window", "pass None to track every training step."
        )
        if (
            self.task_window is not None
            and self.refresh_every is not None
            and self.task_window > self.refresh_every
        ):
            raise ValueError(
                f"task_window={self.task_window} exceeds refresh_every={self.refresh_every}; "
                "pass task_window <= refresh_every or None."
            )
        self.max_batches = _check_optional_positive_int(
            self.max_batches, "max_batches", "pass None to use the whole loader."
        )
        self.token_fraction = _check_fraction(self.token_fraction, "token_fraction")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
        ):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}.")
        if self.seed is not None:
            self.seed = int(self.seed)  # saved as JSON: no numpy integers

        if self.lora_init not in LORA_INITS:
            raise ValueError(
                f'lora_init must be one of {LORA_INITS}, got {self.lora_init!r}: "basis" starts '
                "lora_A in the pencil's top eigenvectors, \"keep\" keeps PEFT's random init."
            )
        if self.lora_b not in LORA_B_MODES:
            raise ValueError(
                f'lora_b must be one of {LORA_B_MODES}, got {self.lora_b!r}: "pencil" gates lora_B '
                'in the r-dimensional pencil, "adam" trains it with plain Adam.'
            )
        if self.lora_b_tau not in ("layer", "rank"):
            raise ValueError(
                f'lora_b_tau must be "layer" or "rank", got {self.lora_b_tau!r}: the layer\'s own τ, '
                "or the tau rule on lora_B's r eigenvalues."
            )
        self.lora_refresh_every = _check_optional_positive_int(
            self.lora_refresh_every,
            "lora_refresh_every",
            "e.g. lora_refresh_every=25, or None to re-solve only at the handle's refreshes.",
        )

    def to_json_dict(self) -> dict[str, Any]:
        """The fields as JSON-serializable values (a callable gate is stored as ``"<callable>"``).

        Returns
        -------
        dict
        """
        out = asdict(self)
        if callable(self.gate):
            out["gate"] = "<callable>"
        return out

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any], **overrides: Any) -> PreserveConfig:
        """Rebuild from :meth:`to_json_dict`; ``overrides`` replace fields (e.g. a callable gate).

        When ``overrides`` changes ``method``, the method-dependent fields (``reg``,
        ``tau_fraction``) whose saved values are the saved method's defaults take the new method's
        defaults, as :func:`~rqcore_torch.preserve` would give them; pass them again to keep them.

        Parameters
        ----------
        data : mapping
            Fields as :meth:`to_json_dict` wrote them (e.g. the configuration of a saved handle);
            missing fields take their defaults.
        **overrides
            Fields that replace the saved values.

        Returns
        -------
        PreserveConfig
            Validated by ``__post_init__`` like a configuration built directly.

        Raises
        ------
        ValueError
            On unknown keys in ``data``, a saved callable gate without a ``gate=`` override, or a
            value the validation rejects.
        TypeError
            On an override that is not a field, or a value of the wrong type.

        Examples
        --------
        >>> saved = PreserveConfig(method="gate").to_json_dict()
        >>> PreserveConfig.from_json_dict(saved, method="folora").reg  # FoLoRA's default reg
        0.1
        """
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"unknown configuration keys {sorted(unknown)} (file from a newer version?)."
            )
        values = {**dict(data), **overrides}
        old_method, new_method = data.get("method"), overrides.get("method")
        if new_method is not None and new_method != old_method and old_method in METHODS:
            saved_defaults = _method_defaults(str(old_method))
            for key, default in saved_defaults.items():
                if key not in overrides and data.get(key) == default:
                    values[key] = None  # re-derived for the new method in __post_init__
        if values.get("gate") == "<callable>":
            raise ValueError(
                "the run used a callable gate, which is not saved; pass gate=... to load()."
            )
        return cls(**values)
