"""Regression tests of rqcore_torch.sampling (review 12): stop tokens, cache corruption and seeds,
position limits and mix weight normalization.

Uses the tiny GPT-2 of tests/_tiny_gpt2.py (2 layers, width 64, 128 positions).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

import _tiny_gpt2  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from rqcore_torch.sampling import mix, sample_calibration  # noqa: E402

SMALL = {"num_samples": 6, "max_new_tokens": 12, "batch_size": 4, "progress": False}
# Three batches of 3, 3 and 1 samples.
CACHED = {"num_samples": 7, "max_new_tokens": 8, "batch_size": 3, "progress": False, "seed": 5}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache = getattr(request.config, "cache", None)
    root = (
        Path(cache.mkdir("rqcore_tiny_gpt2"))
        if cache is not None
        else tmp_path_factory.mktemp("tiny_gpt2")
    )
    return _tiny_gpt2.load_or_train(root)


@pytest.fixture
def model(tiny: Any) -> Any:
    return tiny[0]


@pytest.fixture
def tokenizer(tiny: Any) -> Any:
    return tiny[1]


@pytest.fixture(scope="module")
def cached_reference(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """A complete cache made with ``CACHED`` and the samples it holds."""
    root = tmp_path_factory.mktemp("cache") / "ref"
    samples = sample_calibration(tiny[0], tiny[1], cache=root, **CACHED)
    return root, samples.sequences


def _spy_generate(monkeypatch: pytest.MonkeyPatch, model: Any) -> list[int]:
    calls: list[int] = []
    original = model.generate

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return calls


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------
# 1. stop tokens


def test_model_stop_tokens_apply_with_a_tokenizer(model: Any, tokenizer: Any) -> None:
    kw = {"num_samples": 8, "max_new_tokens": 30, "batch_size": 8, "seed": 0, "progress": False}
    free = sample_calibration(model, tokenizer, **kw)
    counts = Counter(t for s in free.sequences for t in s[1:-1] if t != tokenizer.eos_token_id)
    stop = counts.most_common(1)[0][0]
    other = copy.deepcopy(model)
    # An extra stop id such as an end-of-turn token, which plain `generate` stops on.
    other.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    with_tok = sample_calibration(other, tokenizer, **kw)
    without_tok = sample_calibration(other, None, **kw)
    assert all(stop not in s[1:-1] for s in with_tok.sequences)
    assert any(s[-1] == stop for s in with_tok.sequences)
    assert with_tok.sequences == without_tok.sequences


# ---------------------------------------------------------------------------------------------
# 2. cache corruption


def _drop_seed(root: Path) -> None:
    m = _manifest(root)
    del m["seed"]
    (root / "manifest.json").write_text(json.dumps(m))


def _bad_batches(root: Path) -> None:
    m = _manifest(root)
    m["batches"] = "xyz"
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda r: (r / "manifest.json").write_text("{junk"), "not valid JSON"),
        (lambda r: (r / "manifest.json").write_text(""), "not valid JSON"),
        (lambda r: (r / "manifest.json").write_text("[1, 2]"), "not an object"),
        (_drop_seed, "no 'seed'"),
        (_bad_batches, "'batches'"),
    ],
    ids=["junk", "empty", "list", "no-seed", "batches-not-a-list"],
)
def test_corrupted_manifest_raises_naming_path_and_fix(
    model: Any,
    tokenizer: Any,
    tmp_path: Path,
    cached_reference: tuple[Path, list],
    mutate: Callable[[Path], None],
    reason: str,
) -> None:
    root = tmp_path / "c"
    shutil.copytree(cached_reference[0], root)
    mutate(root)
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    with pytest.raises(ValueError, match="corrupted") as info:
        sample_calibration(model, tokenizer, cache=root, **CACHED)
    message = str(info.value)
    assert str(root / "manifest.json") in message and reason in message
    assert "delete the directory" in message and "another `cache` directory" in message
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before  # nothing rewritten


def _save_batch1(root: Path, **tensors: Any) -> None:
    save_file(tensors, str(root / "batch_00001.safetensors"))


def _resplit(root: Path) -> None:
    # Same tokens, lengths that still sum to their count: silently different samples before.
    data = load_file(str(root / "batch_00001.safetensors"))
    lengths = data["lengths"].clone()
    lengths[0] += 1
    lengths[1] -= 1
    _save_batch1(root, tokens=data["tokens"], lengths=lengths)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda r: _save_batch1(r, foo=torch.zeros(3)), "no 'tokens'"),
        (lambda r: _save_batch1(r, tokens=torch.arange(10), lengths=torch.tensor([5, 5])), "2 len"),
        (
            lambda r: _save_batch1(r, tokens=torch.arange(10), lengths=torch.tensor([3, 3, 30])),
            "sum to 36",
        ),
        (
            lambda r: _save_batch1(r, tokens=torch.rand(27), lengths=torch.tensor([9, 9, 9])),
            "float32",
        ),
        (_resplit, "prompt plus"),
    ],
    ids=["missing-key", "lengths-count", "lengths-sum", "float-tokens", "resplit"],
)
def test_inconsistent_batch_file_is_regenerated(
    model: Any,
    tokenizer: Any,
    tmp_path: Path,
    cached_reference: tuple[Path, list],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    mutate: Callable[[Path], None],
    reason: str,
) -> None:
    root = tmp_path / "c"
    shutil.copytree(cached_reference[0], root)
    mutate(root)
    calls = _spy_generate(monkeypatch, model)
    with caplog.at_level(logging.WARNING, logger="rqcore_torch.sampling"):
        again = sample_calibration(model, tokenizer, cache=root, **CACHED)
    assert again.sequences == cached_reference[1]
    assert again.stats is not None and again.stats.from_cache == 1
    assert len(calls) == 2  # batches 1 and 2
    assert "batch_00001.safetensors is inconsistent" in caplog.text and reason in caplog.text
    assert _manifest(root)["complete"] is True
    # The regenerated file is read back from now on.
    assert sample_calibration(model, tokenizer, cache=root, **CACHED).stats.from_cache == 3


# ---------------------------------------------------------------------------------------------
# 3. positions


def test_too_many_positions_raise_up_front(model: Any, tokenizer: Any, tmp_path: Path) -> None:
    limit = model.config.n_positions
    with pytest.raises(ValueError, match=r"max_new_tokens=200 .* maximum of 128 .* <= 127"):
        sample_calibration(
            model, tokenizer, **{**SMALL, "max_new_tokens": 200}, cache=tmp_path / "c"
        )
    assert not (tmp_path / "c").exists()
    long_prompt = [tokenizer.bos_token_id] + [10] * 99  # 100 tokens: 28 new ones fit
    with pytest.raises(ValueError, match=r"longest prompt \(100 tokens\).*<= 28"):
        sample_calibration(
            model, tokenizer, prompts=[[0, 5], long_prompt], **{**SMALL, "max_new_tokens": 29}
        )
    # Exactly the position table: accepted.
    fits = sample_calibration(
        model,
        tokenizer,
        prompts=[long_prompt],
        **{**SMALL, "num_samples": 1, "max_new_tokens": limit - 100, "min_new_tokens": 0},
    )
    assert len(fits.sequences[0]) <= limit


# ---------------------------------------------------------------------------------------------
# 4-5. seeds and the cache


def test_numpy_integer_seed_with_cache(model: Any, tokenizer: Any, tmp_path: Path) -> None:
    plain = sample_calibration(model, tokenizer, seed=5, **SMALL)
    cached = sample_calibration(model, tokenizer, seed=np.int64(5), cache=tmp_path, **SMALL)
    assert cached.sequences == plain.sequences
    assert _manifest(tmp_path)["seed"] == 5
    again = sample_calibration(model, tokenizer, seed=5, cache=tmp_path, **SMALL)
    assert again.stats is not None and again.stats.from_cache == 2
    for bad in (2.5, "5", True):
        with pytest.raises(TypeError, match="seed must be an integer"):
            sample_calibration(model, tokenizer, seed=bad, **SMALL)


def test_drawn_seed_passed_back_reuses_the_cache(
    model: Any, tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn = sample_calibration(model, tokenizer, seed=None, cache=tmp_path / "a", **SMALL)
    assert drawn.stats is not None
    calls = _spy_generate(monkeypatch, model)
    back = sample_calibration(
        model, tokenizer, seed=drawn.stats.seed, cache=tmp_path / "a", **SMALL
    )
    assert calls == [] and back.sequences == drawn.sequences
    assert back.stats is not None and back.stats.seed == drawn.stats.seed
    with pytest.raises(ValueError, match=rf"differing: seed.*seed={drawn.stats.seed}"):
        sample_calibration(
            model, tokenizer, seed=drawn.stats.seed + 1, cache=tmp_path / "a", **SMALL
        )
    # The other way round: a cache begun with an explicit seed is reused by seed=None.
    sample_calibration(model, tokenizer, seed=7, cache=tmp_path / "b", **SMALL)
    calls.clear()
    reused = sample_calibration(model, tokenizer, seed=None, cache=tmp_path / "b", **SMALL)
    assert calls == [] and reused.stats is not None and reused.stats.seed == 7
    # Manifests written before the seed left the arguments (args["seed"] recorded) still read.
    m = _manifest(tmp_path / "b")
    m["args"]["seed"] = 7
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(m))
    old = sample_calibration(model, tokenizer, seed=7, cache=tmp_path / "b", **SMALL)
    assert calls == [] and old.sequences == reused.sequences


# ---------------------------------------------------------------------------------------------
# 6. mix


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_mix_normalizes_huge_weights_without_overflow() -> None:
    assert mix([1], [2], weights=[1e308, 1e308]).weights == (0.5, 0.5)
    w = mix([1], [2], [3], weights=[1e308, 1e308, 0]).weights
    assert w == (0.5, 0.5, 0.0)
    assert mix([1], [2], weights=[1, 3]).weights == (0.25, 0.75)  # ordinary weights: unchanged
