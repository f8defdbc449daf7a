"""Calibration inputs sampled from the pretrained model itself.

The forgetting penalty needs inputs that stand for what the model already does. The original
pretraining data is rarely at hand and any single proxy data set is biased, so
:func:`sample_calibration` draws the proxy from the model: it samples continuations with Hugging Face
``generate`` and returns them as a re-iterable loader of right-padded batches, ready for
``preserve(model, sample_calibration(model, tokenizer, ...))``. :func:`mix` blends such self-samples
with a real proxy set; its weights act on the statistics, not on the batch order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rqcore.exceptions import RqcoreWarning

__all__ = [
    "COLLAPSE_DISTINCT2_THRESHOLD",
    "CalibrationMix",
    "CalibrationSamples",
    "SamplingCollapseWarning",
    "SamplingStats",
    "mix",
    "sample_calibration",
]

logger = logging.getLogger(__name__)

#: Below this distinct-2 ratio (distinct bigrams / bigrams over the generated tokens of all samples)
#: :func:`sample_calibration` warns that sampling collapsed. Degenerate repetition loops sit far below
#: it (a greedy loop of period p has distinct-2 ≈ p / length); diverse text of the sizes used for
#: calibration sits well above it.
COLLAPSE_DISTINCT2_THRESHOLD = 0.1

_CACHE_VERSION = 1
_MANIFEST = "manifest.json"
# Elements read from each fingerprinted parameter: enough to tell checkpoints apart, cheap on any size.
_FINGERPRINT_ELEMENTS = 4096


class SamplingCollapseWarning(RqcoreWarning):
    """Self-sampling produced low-diversity text (distinct-2 below ``COLLAPSE_DISTINCT2_THRESHOLD``).

    Statistics computed on such samples over-weight a few repeated patterns. Raise ``temperature`` or
    ``top_p``/``top_k``, pass varied ``prompts``, or :func:`mix` in a real proxy set.
    """


@dataclass(frozen=True)
class SamplingStats:
    """Diversity and throughput report of one :func:`sample_calibration` call.

    Parameters
    ----------
    num_generated : int
        Samples produced by the sampler (before dedupe).
    num_duplicates : int
        Exact duplicates among them (dropped when ``dedupe=True``).
    num_kept : int
        Samples in the returned loader.
    num_new_tokens : int
        Generated tokens over all samples (prompts and padding excluded).
    distinct_1, distinct_2, distinct_3 : float
        Distinct n-grams / n-grams over the generated tokens of all produced samples, n-grams taken
        within each sample (nan when there are no n-grams).
    tokens_per_second : float or None
        Generation throughput of this call (None when everything came from the cache).
    from_cache : int
        Batches read back from the cache instead of generated.
    seed : int
        The base seed batch seeds were derived from (drawn at random when ``seed=None`` was passed:
        pass it back to reproduce the run).
    """

    num_generated: int
    num_duplicates: int
    num_kept: int
    num_new_tokens: int
    distinct_1: float
    distinct_2: float
    distinct_3: float
    tokens_per_second: float | None
    from_cache: int
    seed: int

    @property
    def collapsed(self) -> bool:
        """Whether distinct-2 fell below :data:`COLLAPSE_DISTINCT2_THRESHOLD`."""
        return bool(self.distinct_2 < COLLAPSE_DISTINCT2_THRESHOLD)


class CalibrationSamples:
    """Self-sampled calibration inputs: a re-iterable loader of right-padded token batches.

    Built by :func:`sample_calibration`; iterating it yields dicts ``{"input_ids", "attention_mask"}``
    of ``int64`` tensors of shape ``(b, L)`` on ``device``, with ``b <= batch_size`` and ``L`` the
    longest sample of the batch. Each sample sits at positions ``0..len-1``; the tail is
    ``pad_token_id`` with mask 0. Batches are built on each iteration (only token lists are stored).

    Parameters
    ----------
    sequences : list of list of int
        Token ids of each sample: the prompt (BOS when none was given) followed by the generated
        tokens, up to and including the first EOS.
    batch_size : int
        Samples per yielded batch.
    pad_token_id : int
        Id written in the padding (masked out; any id works).
    texts : list of str, optional
        Decoded samples (given when a tokenizer was).
    stats : SamplingStats, optional
        Diversity and throughput report.
    device : torch.device or str, optional
        Where the yielded tensors are put (default: the CPU). :func:`sample_calibration` sets the
        model's device, since calibration passes feed batches to the model as they come.

    Attributes
    ----------
    sequences, texts, stats, batch_size, pad_token_id, device
        As given.

    Examples
    --------
    >>> samples = CalibrationSamples([[1, 5, 6], [1, 7]], batch_size=2, pad_token_id=0)
    >>> batch = next(iter(samples))
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
    ([[1, 5, 6], [1, 7, 0]], [[1, 1, 1], [1, 1, 0]])
    >>> len(samples)
    1
    """

    def __init__(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        batch_size: int,
        pad_token_id: int,
        texts: Sequence[str] | None = None,
        stats: SamplingStats | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sequences: list[list[int]] = [[int(t) for t in s] for s in sequences]
        if any(len(s) == 0 for s in self.sequences):
            raise ValueError("every sequence must hold at least one token")
        self.texts: list[str] | None = list(texts) if texts is not None else None
        self.stats = stats
        self.batch_size = int(batch_size)
        self.pad_token_id = int(pad_token_id)
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def to(self, device: torch.device | str) -> CalibrationSamples:
        """The same samples, yielded on ``device``.

        Parameters
        ----------
        device : torch.device or str
            Where the yielded tensors go.

        Returns
        -------
        CalibrationSamples
            A new loader sharing this one's sequences, texts and stats.
        """
        return CalibrationSamples(
            self.sequences,
            batch_size=self.batch_size,
            pad_token_id=self.pad_token_id,
            texts=self.texts,
            stats=self.stats,
            device=device,
        )

    def __len__(self) -> int:
        return math.ceil(len(self.sequences) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self.sequences), self.batch_size):
            batch = _right_pad(self.sequences[start : start + self.batch_size], self.pad_token_id)
            yield {k: v.to(self.device) for k, v in batch.items()}

    def __repr__(self) -> str:
        return (
            f"CalibrationSamples({len(self.sequences)} samples, batch_size={self.batch_size}, "
            f"{len(self)} batches)"
        )


class CalibrationMix:
    """Weighted blend of calibration sources, merged on the statistics.

    Built by :func:`mix`. A calibration pass (``preserve``/``calibrate``) runs each source into its
    own accumulators and combines the normalized second moments as ``Σ_s w_s C_s``: a source's weight is
    its share of the statistics whatever its number of batches or tokens.

    Parameters
    ----------
    sources : sequence of (iterable, float)
        Loaders and their weights, already validated and normalized to sum 1 (use :func:`mix`).

    Attributes
    ----------
    sources : tuple of (iterable, float)
        The loaders and their normalized weights.

    Raises
    ------
    TypeError
        On iteration: a mix is not a loader (interleaving batches would weight sources by their
        token counts, which the mix exists to avoid).

    Examples
    --------
    >>> m = mix([[1]], [[2], [3]], weights=[3, 1])
    >>> [w for _, w in m.sources]
    [0.75, 0.25]
    """

    def __init__(self, sources: Sequence[tuple[Iterable[Any], float]]) -> None:
        self.sources: tuple[tuple[Iterable[Any], float], ...] = tuple(
            (loader, float(w)) for loader, w in sources
        )

    @property
    def weights(self) -> tuple[float, ...]:
        """The normalized weights, in source order."""
        return tuple(w for _, w in self.sources)

    def __iter__(self) -> Iterator[Any]:
        raise TypeError(
            "a CalibrationMix is not a loader: pass it to rqcore_torch.preserve/calibrate, which run "
            "each source into its own statistics and merge them as sum_s w_s C_s. Iterate "
            "`mix.sources` to reach the loaders."
        )

    def __len__(self) -> int:
        return len(self.sources)

    def __repr__(self) -> str:
        parts = ", ".join(f"{type(loader).__name__}: {w:.3g}" for loader, w in self.sources)
        return f"CalibrationMix({parts})"


def mix(*loaders: Iterable[Any], weights: Sequence[float] | None = None) -> CalibrationMix:
    """Blend calibration loaders with weights that act on the statistics.

    Parameters
    ----------
    *loaders : iterable
        Calibration loaders (e.g. a :class:`CalibrationSamples` and a DataLoader over a real proxy
        set). A :class:`CalibrationMix` among them is flattened, its weights scaled by its own.
    weights : sequence of float, optional
        One non-negative finite weight per loader, with a positive sum; normalized to sum 1.
        Default: equal weights.

    Returns
    -------
    CalibrationMix
        ``.sources`` holds ``(loader, weight)`` pairs with weights summing to 1.

    Raises
    ------
    ValueError
        No loader; weights of another count, negative, non-finite or summing to 0.
    TypeError
        A loader that is not iterable.

    Notes
    -----
    The weights do not interleave batches: the calibration pass accumulates each source separately
    and combines the normalized covariances as ``Σ_s w_s C_s``, so ``weights=[0.5, 0.5]`` gives both
    sources the same say even when one has ten times the tokens.

    Examples
    --------
    >>> blend = mix(["self-sample batch"], ["proxy batch 1", "proxy batch 2"], weights=[1, 3])
    >>> blend.weights
    (0.25, 0.75)
    """
    if not loaders:
        raise ValueError("mix needs at least one loader")
    for i, loader in enumerate(loaders):
        if not isinstance(loader, CalibrationMix) and not isinstance(loader, Iterable):
            raise TypeError(f"loader {i} ({type(loader).__name__}) is not iterable")
    if weights is None:
        w = np.ones(len(loaders))
    else:
        try:
            w = np.asarray([float(x) for x in weights], dtype=float)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"weights must be real numbers, got {weights!r}") from exc
        if w.shape != (len(loaders),):
            raise ValueError(f"got {len(loaders)} loaders but {w.size} weights")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    if np.any(w < 0):
        raise ValueError(f"weights must be non-negative, got {w.tolist()}")
    with np.errstate(over="ignore"):
        total = w.sum()
    if not total > 0:
        raise ValueError("weights must have a positive sum")
    if not math.isfinite(total):
        # Finite weights near the float maximum overflow their sum: scale by the largest first.
        w = w / w.max()
        total = w.sum()
    w = w / total
    sources: list[tuple[Iterable[Any], float]] = []
    for loader, wi in zip(loaders, w, strict=True):
        if isinstance(loader, CalibrationMix):
            sources.extend((inner, float(wi) * wj) for inner, wj in loader.sources)
        else:
            sources.append((loader, float(wi)))
    return CalibrationMix(sources)


def sample_calibration(
    model: Any,
    tokenizer: Any = None,
    *,
    num_samples: int,
    max_new_tokens: int,
    batch_size: int = 16,
    prompts: Sequence[str] | Sequence[Sequence[int]] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    min_new_tokens: int = 1,
    dedupe: bool = True,
    cache: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> CalibrationSamples:
    """Sample calibration inputs from a causal language model itself.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model with ``generate`` (``model.can_generate()`` true), e.g. ``AutoModelForCausalLM``.
    tokenizer : transformers tokenizer, optional
        Used to encode string prompts, to find BOS/EOS/pad ids and to decode ``.texts``.
    num_samples : int
        Samples to generate (the loader holds fewer when ``dedupe`` drops duplicates).
    max_new_tokens : int
        Tokens generated per sample at most (a sample stops at its first stop token). The longest
        prompt plus ``max_new_tokens`` must fit in the model's positions (``config.n_positions`` or
        ``config.max_position_embeddings``).
    batch_size : int, default 16
        Samples per ``generate`` call and per yielded batch.
    prompts : list of str or list of list of int, optional
        Starting points, cycled over the samples. Strings are encoded with the tokenizer (BOS is
        prepended when the tokenizer has one and did not add it); token-id lists are used as given.
        Default: every sample starts from the BOS token alone.
    temperature : float, default 1.0
        Softmax temperature (> 0). 1.0 samples the model's own distribution.
    top_p : float, default 1.0
        Nucleus sampling mass in (0, 1]; 1.0 disables it.
    top_k : int, optional
        Keep the k most likely tokens; None disables it (the model's ``generation_config`` is
        overridden here, so Hugging Face's default of 50 does not apply).
    seed : int, optional
        Makes sampling reproducible (a Python or NumPy integer). Batch ``k`` is drawn with a seed
        derived from ``(seed, k)`` inside a forked RNG, so the caller's RNG state is untouched and a
        resumed run reproduces an uninterrupted one. None draws a fresh seed, or reuses the one stored
        in ``cache`` (see *Cache and seed* below); ``stats.seed`` reports the seed used.
    min_new_tokens : int, default 1
        EOS is suppressed until this many tokens were generated (no empty samples).
    dedupe : bool, default True
        Drop exact duplicate samples (keeping the first), the mark of degenerate repetition loops.
    cache : path, optional
        Directory where each batch is written as it is produced (``batch_00000.safetensors``, ... and
        ``manifest.json``). A later call with the same model and arguments reads it back; an interrupted
        run resumes after the last complete batch. A missing, unreadable or inconsistent batch file
        (torn write, wrong keys, lengths that disagree with its tokens or prompts) is logged and
        regenerated from that batch on; a corrupted ``manifest.json`` raises (delete the directory).
    progress : bool, default True
        Show a tqdm bar over samples with the throughput in tokens/s.

    Returns
    -------
    CalibrationSamples
        Re-iterable loader of right-padded ``{"input_ids", "attention_mask"}`` batches, with
        ``.sequences``, ``.texts`` (None without a tokenizer) and ``.stats``.

    Raises
    ------
    TypeError
        The model cannot generate (e.g. an encoder); string prompts without a tokenizer; a flat
        list of token ids as ``prompts`` (wrap it: ``[[...]]``); a ``seed`` that is not an integer.
    ValueError
        Invalid arguments; no BOS token and no prompts; a prompt plus ``max_new_tokens`` longer than
        the model's positions; a cache made with other arguments, another seed or another model; a
        corrupted cache manifest.

    Warns
    -----
    SamplingCollapseWarning
        When distinct-2 of the generated tokens is below :data:`COLLAPSE_DISTINCT2_THRESHOLD`.

    Notes
    -----
    *Padding.* Prompts of different lengths are left-padded for ``generate`` (with an attention mask,
    from which Hugging Face derives the positions); the padding is then stripped and the returned batches
    are padded on the right, so a plain forward sees every sample at positions ``0..len-1``. The pad id
    is ``tokenizer.pad_token_id``, else the EOS id, else 0; it never reaches the statistics (mask 0).

    *Samples.* A sample is its prompt followed by its generated tokens, cut after the first stop
    token. The stop tokens are the union of the tokenizer's EOS and the model's own EOS ids
    (``generation_config.eos_token_id``, else ``config.eos_token_id``), as plain ``generate`` would
    stop on the latter. The model's own ``generation_config`` is overridden to plain ancestral
    sampling (no repetition penalty, n-gram blocking, beams or typical/epsilon/eta/min-p cutoffs)
    with the given ``temperature``/``top_p``/``top_k``.

    *Modes.* The model is put in eval mode while sampling and each module's train/eval mode is restored
    afterwards. Sampling runs on the device of the model's first parameter, and the returned loader
    yields its batches there (``.to(device)`` gives a copy for another device); the token lists
    themselves are kept on the host.

    *Fingerprint.* A cache records a SHA-256 of the model config, of a strided subset of the first,
    middle and last parameter tensors and of the sampling arguments (``dedupe`` and ``progress``
    excluded: they do not change what is generated; the seed is checked on its own, see below). The
    subset keeps the check cheap on any model size but is no full checksum: weights that differ only
    elsewhere go undetected. One process at a time should write a given cache directory.

    *Cache and seed.* A cache stores the base seed it was made with (the drawn one when
    ``seed=None``). A later call with ``seed=None`` reuses the stored seed; an explicit seed must equal
    it. So a cache begun with ``seed=None`` is also reused by passing its ``stats.seed`` back, and a
    cache begun with ``seed=5`` by ``seed=None``.

    *Throughput.* Samples are generated ``batch_size`` at a time; on the 2-layer, width-64 GPT-2 of the
    tests (one CPU thread, 48 samples of 48 new tokens in batches of 16) this runs at roughly 1.3-3k
    generated tokens/s. ``stats.tokens_per_second`` reports the figure of each call.

    Examples
    --------
    >>> samples = sample_calibration(model, tokenizer, num_samples=256, max_new_tokens=128,
    ...                              seed=0, cache="calib-cache")  # doctest: +SKIP
    >>> handle = rqcore_torch.preserve(model, samples)  # doctest: +SKIP
    """
    can_generate = getattr(model, "can_generate", None)
    if not callable(getattr(model, "generate", None)) or not callable(can_generate):
        raise TypeError(_no_generate_message(model))
    if not can_generate():
        raise TypeError(_no_generate_message(model))
    _check_args(num_samples, max_new_tokens, batch_size, temperature, top_p, top_k, min_new_tokens)
    seed = _check_seed(seed)

    eos_ids = _eos_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer, eos_ids)
    prompt_ids = _encode_prompts(model, tokenizer, prompts)
    _check_positions(model, prompt_ids, int(max_new_tokens))
    batch_prompts = [
        [
            prompt_ids[i % len(prompt_ids)]
            for i in range(start, min(start + batch_size, num_samples))
        ]
        for start in range(0, num_samples, batch_size)
    ]
    gen_kwargs: dict[str, Any] = {
        "do_sample": True,
        "max_new_tokens": int(max_new_tokens),
        "min_new_tokens": int(min_new_tokens),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "top_k": int(top_k) if top_k is not None else 0,
        # Neutralize any distortion a checkpoint's generation_config.json may carry.
        "num_beams": 1,
        "num_return_sequences": 1,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "typical_p": 1.0,
        "epsilon_cutoff": 0.0,
        "eta_cutoff": 0.0,
        "min_p": 0.0,
        "return_dict_in_generate": False,
        "pad_token_id": pad_id,
        "eos_token_id": eos_ids if eos_ids else None,
    }
    args_fp = {
        "num_samples": int(num_samples),
        "max_new_tokens": int(max_new_tokens),
        "batch_size": int(batch_size),
        "prompts": prompt_ids,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "top_k": int(top_k) if top_k is not None else None,
        # No "seed": the cache checks it apart, so seed=None and the stored seed both reuse a cache.
        "min_new_tokens": int(min_new_tokens),
        "pad_token_id": pad_id,
        "eos_token_ids": eos_ids,
    }

    store = _Cache(Path(cache), model, args_fp, seed) if cache is not None else None
    if store is not None:
        base_seed = store.seed
        done = store.load(batch_prompts, int(max_new_tokens))
    else:
        base_seed = seed if seed is not None else secrets.randbits(63)
        done = []
    from_cache = len(done)

    device = _model_device(model)
    produced: list[list[list[int]]] = list(done)
    new_tokens = 0
    elapsed = 0.0
    bar = _progress_bar(num_samples, progress)
    bar.update(sum(len(b) for b in produced))
    modes = {m: m.training for m in model.modules()} if hasattr(model, "modules") else {}
    try:
        if hasattr(model, "eval"):
            model.eval()
        for k in range(len(produced), len(batch_prompts)):
            t0 = time.perf_counter()
            batch = _generate_batch(
                model,
                batch_prompts[k],
                gen_kwargs,
                pad_id,
                eos_ids,
                device,
                _batch_seed(base_seed, k),
            )
            elapsed += time.perf_counter() - t0
            new_tokens += sum(len(s) - len(p) for s, p in zip(batch, batch_prompts[k], strict=True))
            produced.append(batch)
            if store is not None:
                store.save_batch(k, batch, complete=k == len(batch_prompts) - 1)
            bar.update(len(batch))
            if elapsed > 0:
                bar.set_postfix(tok_s=f"{new_tokens / elapsed:.0f}")
    finally:
        bar.close()
        for m, was_training in modes.items():
            m.training = was_training
    if store is not None:
        store.mark_complete(len(produced) == len(batch_prompts))

    flat = [s for batch in produced for s in batch]
    flat_prompts = [p for batch in batch_prompts for p in batch]
    continuations = [s[len(p) :] for s, p in zip(flat, flat_prompts, strict=True)]
    kept = _dedupe(flat) if dedupe else flat
    num_dup = len(flat) - len(_dedupe(flat))
    d1, d2, d3 = (_distinct_n(continuations, n) for n in (1, 2, 3))
    tps = new_tokens / elapsed if elapsed > 0 else None
    stats = SamplingStats(
        num_generated=len(flat),
        num_duplicates=num_dup,
        num_kept=len(kept),
        num_new_tokens=sum(len(c) for c in continuations),
        distinct_1=d1,
        distinct_2=d2,
        distinct_3=d3,
        tokens_per_second=tps,
        from_cache=from_cache,
        seed=int(base_seed),
    )
    logger.info(
        "sampled %d calibration samples (%d duplicates%s, %d from cache batches); "
        "distinct-1/2/3 = %.3f/%.3f/%.3f; %s tokens/s",
        stats.num_generated,
        num_dup,
        " dropped" if dedupe else " kept",
        from_cache,
        d1,
        d2,
        d3,
        f"{tps:.0f}" if tps is not None else "n/a",
    )
    if stats.collapsed:
        warnings.warn(
            f"self-sampling collapsed: distinct-2 = {d2:.3f} < {COLLAPSE_DISTINCT2_THRESHOLD} "
            f"({num_dup} of {len(flat)} samples are exact duplicates). Raise temperature/top_p/top_k, "
            "pass varied prompts, or mix in a real proxy set (rqcore_torch.mix).",
            SamplingCollapseWarning,
            stacklevel=2,
        )
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode(s, skip_special_tokens=True) for s in kept]
    return CalibrationSamples(
        kept, batch_size=batch_size, pad_token_id=pad_id, texts=texts, stats=stats, device=device
    )


# --------------------------------------------------------------------------------------------------
# helpers


def _no_generate_message(model: Any) -> str:
    return (
        f"{type(model).__name__} cannot generate (no `generate`, or `can_generate()` is False), so "
        "sample_calibration cannot draw inputs from it. Pass any loader of representative inputs to "
        "preserve instead; for an encoder (BERT-like), a corpus of generic text (e.g. a slice of "
        "Wikipedia or of its pretraining mix) tokenized into {'input_ids', 'attention_mask'} batches."
    )


def _check_args(
    num_samples: int,
    max_new_tokens: int,
    batch_size: int,
    temperature: float,
    top_p: float,
    top_k: int | None,
    min_new_tokens: int,
) -> None:
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k is not None and int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if not (0 <= int(min_new_tokens) <= int(max_new_tokens)):
        raise ValueError(
            f"min_new_tokens must lie in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}"
        )


def _check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(
            f"seed must be an integer (int or NumPy integer) or None, got {type(seed).__name__} "
            f"{seed!r}; pass e.g. seed=int(seed)"
        )
    return int(seed)  # a NumPy integer would not serialize to the cache manifest


def _max_positions(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
            return int(value)
    return None


def _check_positions(model: Any, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
    # Checked up front: past the position table, generate fails mid-run with a bare IndexError.
    limit = _max_positions(model)
    longest = max(len(p) for p in prompt_ids)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} makes "
            f"{longest + max_new_tokens} positions, beyond the model's maximum of {limit} "
            f"(config.n_positions / max_position_embeddings); pass max_new_tokens <= "
            f"{max(limit - longest, 0)} or shorter prompts"
        )


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    # The union of the tokenizer's EOS and the model's stop ids (those plain generate would stop on,
    # e.g. an end-of-turn token), tokenizer EOS first: it is the pad fallback.
    ids: list[int] = []
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    model_ids = _as_id_list(getattr(gen_cfg, "eos_token_id", None))
    if not model_ids:
        model_ids = _as_id_list(getattr(getattr(model, "config", None), "eos_token_id", None))
    ids.extend(model_ids)
    return list(dict.fromkeys(ids))


def _pad_id(tokenizer: Any, eos_ids: list[int]) -> int:
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    if eos_ids:
        return eos_ids[0]
    return 0


def _bos_id(model: Any, tokenizer: Any) -> int | None:
    if tokenizer is not None and getattr(tokenizer, "bos_token_id", None) is not None:
        return int(tokenizer.bos_token_id)
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        ids = _as_id_list(getattr(cfg, "bos_token_id", None))
        if ids:
            return ids[0]
    return None


def _encode_prompts(
    model: Any, tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]] | None
) -> list[list[int]]:
    bos = _bos_id(model, tokenizer)
    if prompts is None:
        if bos is None:
            raise ValueError(
                "the model and tokenizer define no BOS token to start sampling from: pass `prompts`"
            )
        return [[bos]]
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    out: list[list[int]] = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise TypeError("string prompts need a tokenizer; pass token-id lists otherwise")
            ids = [int(t) for t in tokenizer.encode(p)]
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
        elif isinstance(p, (int, np.integer)):
            raise TypeError(
                "prompts must be a list of strings or of token-id lists; wrap a single token-id "
                "prompt in a list: prompts=[[...]]"
            )
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise ValueError("a prompt encodes to no tokens")
        out.append(ids)
    return out


def _model_device(model: Any) -> torch.device:
    try:
        return next(iter(model.parameters())).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _batch_seed(seed: int, k: int) -> int:
    # Hashing (seed, k) gives independent, order-free streams: batch k is the same whether the run was
    # resumed or not, and whatever the other batches drew.
    digest = hashlib.sha256(f"rqcore.sampling:{int(seed)}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generate_batch(
    model: Any,
    prompts: list[list[int]],
    gen_kwargs: dict[str, Any],
    pad_id: int,
    eos_ids: list[int],
    device: torch.device,
    seed: int,
) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        # Left padding: every row's last prompt token sits at the same column, where generation starts.
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    # Fork (and seed) only the CPU and the model's own CUDA device: the caller's RNG streams, and
    # those of other GPUs, are left as they were.
    cuda = device.type == "cuda"
    cuda_index = (
        (device.index if device.index is not None else torch.cuda.current_device()) if cuda else 0
    )
    with torch.random.fork_rng(devices=[cuda_index] if cuda else [], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda_index):
                torch.cuda.manual_seed(seed)
        elif device.type != "cpu":
            torch.manual_seed(seed)  # other accelerators: seeded globally, not forked
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
    out = out.detach().cpu()
    eos = set(eos_ids)
    sequences: list[list[int]] = []
    for i, p in enumerate(prompts):
        new = out[i, width:].tolist()
        for j, t in enumerate(new):
            if t in eos:
                new = new[: j + 1]
                break
        sequences.append(list(p) + [int(t) for t in new])
    return sequences


def _right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _dedupe(sequences: list[list[int]]) -> list[list[int]]:
    seen: set[tuple[int, ...]] = set()
    kept = []
    for s in sequences:
        key = tuple(s)
        if key not in seen:
            seen.add(key)
            kept.append(s)
    return kept


def _distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    grams: set[tuple[int, ...]] = set()
    total = 0
    for s in sequences:
        for i in range(len(s) - n + 1):
            grams.add(tuple(s[i : i + n]))
            total += 1
    return len(grams) / total if total else float("nan")


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", desc="self-sampling", disable=not enabled)


def _model_fingerprint(model: Any) -> str:
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    else:
        h.update(type(model).__qualname__.encode())
    params = list(model.named_parameters()) if hasattr(model, "named_parameters") else []
    picks = {0, len(params) // 2, len(params) - 1} if params else set()
    for i in sorted(picks):
        name, p = params[i]
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT_ELEMENTS)
        sub = flat[::step][:_FINGERPRINT_ELEMENTS].to(device="cpu", dtype=torch.float32)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(sub.numpy().tobytes())
    return h.hexdigest()


class _Cache:
    """On-disk store of generated batches: one safetensors file per batch and a JSON manifest.

    The manifest holds the base seed apart from the arguments: ``seed=None`` adopts it and an explicit
    seed must equal it. A corrupted manifest raises; a bad batch file is regenerated (see :meth:`load`).
    """

    def __init__(self, root: Path, model: Any, args: dict[str, Any], seed: int | None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.model_fp = _model_fingerprint(model)
        self.args = json.loads(json.dumps(args))
        self.args_fp = hashlib.sha256(json.dumps(self.args, sort_keys=True).encode()).hexdigest()
        manifest = self._read_manifest()
        if manifest is None:
            self.manifest: dict[str, Any] = {
                "version": _CACHE_VERSION,
                "model_fingerprint": self.model_fp,
                "args_fingerprint": self.args_fp,
                "args": self.args,
                "seed": int(seed) if seed is not None else secrets.randbits(63),
                "batches": [],
                "complete": False,
            }
            self._write_manifest()
        else:
            self._check(manifest, seed)
            self.manifest = manifest

    @property
    def seed(self) -> int:
        return int(self.manifest["seed"])

    def _corrupted(self, reason: str) -> ValueError:
        return ValueError(
            f"cache manifest {self.root / _MANIFEST} is corrupted ({reason}); delete the directory "
            f"{self.root} to regenerate the samples, or pass another `cache` directory"
        )

    def _read_manifest(self) -> dict[str, Any] | None:
        path = self.root / _MANIFEST
        if not path.exists():
            if any(self.root.glob("batch_*.safetensors")):
                raise ValueError(f"cache {self.root} holds batch files but no {_MANIFEST}")
            return None
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise self._corrupted(f"not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise self._corrupted(f"a JSON {type(data).__name__}, not an object")
        self._validate(data)
        return data

    def _validate(self, manifest: dict[str, Any]) -> None:
        if "version" not in manifest:
            raise self._corrupted("no 'version'")
        if manifest["version"] != _CACHE_VERSION:
            raise ValueError(
                f"cache {self.root} has format version {manifest['version']!r}, "
                f"expected {_CACHE_VERSION}; use another directory"
            )
        fields: dict[str, tuple[type, ...]] = {
            "model_fingerprint": (str,),
            "args": (dict,),
            "seed": (int,),
            "batches": (list,),
            "complete": (bool,),
        }
        for key, types in fields.items():
            if key not in manifest:
                raise self._corrupted(f"no {key!r}")
            value = manifest[key]
            if not isinstance(value, types) or (key == "seed" and isinstance(value, bool)):
                raise self._corrupted(f"{key!r} is {value!r}, not a {types[0].__name__}")
        if not all(isinstance(name, str) for name in manifest["batches"]):
            raise self._corrupted("'batches' must list file names")
        # Caches written before the seed was kept apart also record it in "args".
        old_seed = manifest["args"].get("seed")
        if old_seed is not None and old_seed != manifest["seed"]:
            raise self._corrupted(
                f"'seed' is {manifest['seed']!r} but the recorded arguments say {old_seed!r}"
            )

    def _check(self, manifest: dict[str, Any], seed: int | None) -> None:
        if manifest["model_fingerprint"] != self.model_fp:
            raise ValueError(
                f"cache {self.root} was made with another model (config or weights differ); "
                "use another cache directory or delete this one"
            )
        # Compared without "seed", which caches written before the seed was kept apart still hold.
        old = {k: v for k, v in manifest["args"].items() if k != "seed"}
        if old != self.args:
            diff = sorted(k for k in set(old) | set(self.args) if old.get(k) != self.args.get(k))
            raise ValueError(
                f"cache {self.root} was made with other sampling arguments (differing: "
                f"{', '.join(diff) or 'unknown'}); use another cache directory or the same arguments"
            )
        if seed is not None and seed != manifest["seed"]:
            raise ValueError(
                f"cache {self.root} was made with another seed (differing: seed; the cache holds "
                f"seed={manifest['seed']}, got seed={seed}); pass seed={manifest['seed']} or "
                "seed=None to reuse it, or use another cache directory"
            )

    def _write_manifest(self) -> None:
        tmp = self.root / (_MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.manifest, f, indent=1)
        os.replace(tmp, self.root / _MANIFEST)

    def load(
        self, batch_prompts: list[list[list[int]]], max_new_tokens: int
    ) -> list[list[list[int]]]:
        """The longest prefix of recorded batches whose files are present, readable and consistent.

        A batch file is consistent when it holds 1-D int64 ``tokens`` and ``lengths``, one length per
        prompt of its batch, lengths summing to the token count, and each sample is its prompt
        followed by at most ``max_new_tokens`` tokens. The first bad file and those after it are
        dropped from the manifest and regenerated.
        """
        from safetensors.torch import load_file

        batches: list[list[list[int]]] = []
        for k, name in enumerate(self.manifest["batches"]):
            path = self.root / name
            if k >= len(batch_prompts) or name != _batch_name(k) or not path.exists():
                break
            try:
                data = load_file(str(path))
            except Exception:  # a torn write: regenerate from here
                logger.warning("cache file %s is unreadable; regenerating from batch %d", path, k)
                break
            try:
                batches.append(_decode_batch(data, batch_prompts[k], max_new_tokens))
            except ValueError as exc:
                logger.warning(
                    "cache file %s is inconsistent (%s); regenerating from batch %d", path, exc, k
                )
                break
        if len(batches) < len(self.manifest["batches"]):
            self.manifest["batches"] = self.manifest["batches"][: len(batches)]
            self.manifest["complete"] = False
            self._write_manifest()
        if batches:
            logger.info("read %d cached batches from %s", len(batches), self.root)
        return batches

    def save_batch(self, k: int, batch: list[list[int]], *, complete: bool) -> None:
        from safetensors.torch import save_file

        name = _batch_name(k)
        tokens = torch.tensor([t for s in batch for t in s], dtype=torch.long)
        lengths = torch.tensor([len(s) for s in batch], dtype=torch.long)
        tmp = self.root / (name + ".tmp")
        save_file({"tokens": tokens, "lengths": lengths}, str(tmp))
        os.replace(tmp, self.root / name)
        # The manifest is updated after the file is in place: it never lists a missing batch.
        self.manifest["batches"] = [*self.manifest["batches"][:k], name]
        self.manifest["complete"] = complete
        self._write_manifest()

    def mark_complete(self, complete: bool) -> None:
        if bool(self.manifest["complete"]) != complete:
            self.manifest["complete"] = complete
            self._write_manifest()


def _decode_batch(
    data: dict[str, torch.Tensor], prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """The samples of one cached batch file; ValueError when it does not hold what was saved."""
    for key in ("tokens", "lengths"):
        if key not in data:
            raise ValueError(f"no {key!r} tensor")
        if data[key].dtype != torch.long or data[key].dim() != 1:
            raise ValueError(f"{key!r} is {data[key].dtype} of shape {tuple(data[key].shape)}")
    tokens, lengths = data["tokens"].tolist(), data["lengths"].tolist()
    if len(lengths) != len(prompts):
        raise ValueError(f"{len(lengths)} lengths for a batch of {len(prompts)} samples")
    if sum(lengths) != len(tokens):
        raise ValueError(f"lengths sum to {sum(lengths)} but there are {len(tokens)} tokens")
    if any(t < 0 for t in tokens):
        raise ValueError("negative token ids")
    samples: list[list[int]] = []
    start = 0
    for i, (n, p) in enumerate(zip(lengths, prompts, strict=True)):
        sample = tokens[start : start + n]
        start += n
        if not len(p) <= n <= len(p) + max_new_tokens or sample[: len(p)] != p:
            raise ValueError(f"sample {i} is not its prompt plus at most {max_new_tokens} tokens")
        samples.append(sample)
    return samples


def _batch_name(k: int) -> str:
    return f"batch_{k:05d}.safetensors"
