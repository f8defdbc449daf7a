"""Tests of rqcore_torch.sampling: self-sampled calibration inputs from a tiny GPT-2.

The tiny GPT-2 (2 layers, width 64) and its byte-level BPE tokenizer are trained once per session on
stdlib docstrings (tests/_tiny_gpt2.py) and cached on disk, so sampling is non-degenerate.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

import _tiny_gpt2  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from rqcore_torch.sampling import (  # noqa: E402
    COLLAPSE_DISTINCT2_THRESHOLD,
    CalibrationMix,
    CalibrationSamples,
    SamplingCollapseWarning,
    _distinct_n,
    mix,
    sample_calibration,
)

SMALL = {"num_samples": 6, "max_new_tokens": 12, "batch_size": 4, "progress": False}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # On a shared 2-core machine, multi-threaded kernels on tiny tensors mostly spin.
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


def _spy_generate(monkeypatch: pytest.MonkeyPatch, model: Any, fail_on: int | None = None) -> list:
    """Count calls to model.generate; raise on call number ``fail_on`` (simulated interruption)."""
    calls: list[int] = []
    original = model.generate

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if fail_on is not None and len(calls) == fail_on:
            raise KeyboardInterrupt("simulated interruption")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return calls


# ---------------------------------------------------------------------------------------------
# reproducibility, shapes, padding


def test_seed_reproduces_and_leaves_global_rng_alone(model: Any, tokenizer: Any) -> None:
    state = torch.random.get_rng_state()
    a = sample_calibration(model, tokenizer, seed=0, **SMALL)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = sample_calibration(model, tokenizer, seed=0, **SMALL)
    c = sample_calibration(model, tokenizer, seed=1, **SMALL)
    assert a.sequences == b.sequences
    assert a.texts == b.texts
    assert a.sequences != c.sequences
    assert len(a.sequences) == 6  # no duplicates expected at temperature 1


def test_batches_are_right_padded_with_exact_masks(model: Any, tokenizer: Any) -> None:
    s = sample_calibration(
        model, tokenizer, seed=3, num_samples=7, max_new_tokens=16, batch_size=3, progress=False
    )
    assert len(s) == math.ceil(len(s.sequences) / 3) == len(list(s)) == len(list(s))  # re-iterable
    assert s.pad_token_id == tokenizer.pad_token_id
    rows = []
    for batch in s:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape
        assert ids.shape[0] <= 3
        lengths = mask.sum(1)
        assert ids.shape[1] == int(lengths.max())
        expected = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        assert torch.equal(mask, expected)  # ones then zeros: right padding
        assert torch.all(ids[mask == 0] == s.pad_token_id)
        rows += [ids[i, : int(n)].tolist() for i, n in enumerate(lengths)]
    assert rows == s.sequences
    for seq in s.sequences:
        assert seq[0] == tokenizer.bos_token_id
        assert 2 <= len(seq) <= 17
        assert tokenizer.eos_token_id not in seq[1:-1]  # cut after the first EOS
    # Right padding keeps positions: a plain forward gives each sample the logits it has alone.
    batch = next(iter(s))
    with torch.no_grad():
        logits = model(**batch).logits
        for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
            alone = model(input_ids=batch["input_ids"][i : i + 1, :n]).logits[0]
            torch.testing.assert_close(logits[i, :n], alone, atol=1e-4, rtol=1e-4)


def test_prompts_strings_and_ids_cycle(model: Any, tokenizer: Any) -> None:
    bos = tokenizer.bos_token_id
    texts = ["Return the", "A"]
    s = sample_calibration(
        model,
        tokenizer,
        prompts=texts,
        seed=0,
        num_samples=5,
        max_new_tokens=6,
        batch_size=4,
        progress=False,
    )
    encoded = [[bos, *tokenizer.encode(t)] for t in texts]
    assert len(encoded[0]) != len(encoded[1])  # exercises the left padding for generation
    for i, seq in enumerate(s.sequences):
        assert seq[: len(encoded[i % 2])] == encoded[i % 2]
    assert s.texts is not None and s.texts[0].startswith("Return the")
    ids = sample_calibration(
        model,
        None,
        prompts=encoded,
        seed=0,
        num_samples=5,
        max_new_tokens=6,
        batch_size=4,
        progress=False,
    )
    assert ids.texts is None
    assert ids.sequences == s.sequences  # same token ids, same seed: same samples


def test_left_padding_for_generation_is_masked(model: Any, tokenizer: Any) -> None:
    # Greedy (top_k=1): a prompt continued inside a batch of longer prompts equals it continued alone.
    bos = tokenizer.bos_token_id
    long_prompt = [bos, *tokenizer.encode("Return a new list of the")]
    short_prompt = [bos, *tokenizer.encode("If")]
    kw = {"max_new_tokens": 8, "min_new_tokens": 8, "top_k": 1, "seed": 0, "progress": False}
    batched = sample_calibration(
        model, prompts=[long_prompt, short_prompt], num_samples=2, batch_size=2, dedupe=False, **kw
    )
    alone = sample_calibration(model, prompts=[short_prompt], num_samples=1, batch_size=1, **kw)
    assert batched.sequences[1] == alone.sequences[0]


# ---------------------------------------------------------------------------------------------
# dedupe and diversity


def test_dedupe_drops_greedy_duplicates_and_warns(model: Any, tokenizer: Any) -> None:
    kw = {
        "num_samples": 16,
        "max_new_tokens": 12,
        "min_new_tokens": 12,
        "batch_size": 8,
        "top_k": 1,
        "seed": 0,
        "progress": False,
    }
    with pytest.warns(SamplingCollapseWarning, match="distinct-2"):
        s = sample_calibration(model, tokenizer, **kw)
    assert s.stats is not None
    assert (s.stats.num_generated, s.stats.num_duplicates, s.stats.num_kept) == (16, 15, 1)
    assert len(s.sequences) == 1 and len(s) == 1
    assert s.stats.collapsed and s.stats.distinct_2 < COLLAPSE_DISTINCT2_THRESHOLD
    with pytest.warns(SamplingCollapseWarning):
        kept = sample_calibration(model, tokenizer, dedupe=False, **kw)
    assert len(kept.sequences) == 16 and kept.stats is not None
    assert kept.stats.num_duplicates == 15


def test_distinct_n_and_stats(model: Any, tokenizer: Any) -> None:
    assert _distinct_n([[1, 2, 1, 2]], 1) == 0.5
    assert _distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)
    assert _distinct_n([[1, 2], [1, 2]], 2) == 0.5  # n-grams are counted within samples
    assert math.isnan(_distinct_n([[1]], 2))
    s = sample_calibration(model, tokenizer, seed=0, **SMALL)
    st = s.stats
    assert st is not None and st.from_cache == 0 and st.num_duplicates == 0
    assert st.num_new_tokens == sum(len(q) - 1 for q in s.sequences)
    assert 0 < st.distinct_1 <= st.distinct_2 <= st.distinct_3 <= 1
    assert not st.collapsed
    assert st.tokens_per_second is not None and st.tokens_per_second > 0
    assert st.seed == 0
    fresh = sample_calibration(model, tokenizer, **SMALL)  # seed=None: drawn, reported, replayable
    assert fresh.stats is not None
    replay = sample_calibration(model, tokenizer, **{**SMALL, "seed": fresh.stats.seed})
    assert replay.sequences == fresh.sequences


def test_progress_bar_reports_samples_and_tokens_per_second(
    model: Any, tokenizer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    sample_calibration(model, tokenizer, seed=0, **{**SMALL, "progress": True})
    err = capsys.readouterr().err
    assert "self-sampling" in err and "6/6" in err and "tok_s=" in err


# ---------------------------------------------------------------------------------------------
# cache


def test_cache_is_written_and_reused_without_generating(
    model: Any, tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = sample_calibration(model, tokenizer, seed=0, cache=tmp_path, **SMALL)
    names = sorted(os.listdir(tmp_path))
    assert names == ["batch_00000.safetensors", "batch_00001.safetensors", "manifest.json"]
    calls = _spy_generate(monkeypatch, model)
    again = sample_calibration(model, tokenizer, seed=0, cache=tmp_path, **SMALL)
    assert calls == []
    assert again.sequences == first.sequences and again.texts == first.texts
    assert again.stats is not None and again.stats.from_cache == 2
    assert again.stats.tokens_per_second is None


def test_cache_with_seed_none_reuses_the_stored_seed(
    model: Any, tokenizer: Any, tmp_path: Path
) -> None:
    a = sample_calibration(model, tokenizer, cache=tmp_path, **SMALL)
    b = sample_calibration(model, tokenizer, cache=tmp_path, **SMALL)
    assert a.sequences == b.sequences


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_interrupted_run_resumes_identically(
    model: Any, tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = {**SMALL, "num_samples": 10, "batch_size": 3, "seed": 5}  # 4 batches
    reference = sample_calibration(model, tokenizer, **kw)
    # A real interruption: generate raises on the third batch.
    with monkeypatch.context() as m:
        _spy_generate(m, model, fail_on=3)
        with pytest.raises(KeyboardInterrupt):
            sample_calibration(model, tokenizer, cache=tmp_path / "a", **kw)
    assert sorted(os.listdir(tmp_path / "a")) == [
        "batch_00000.safetensors",
        "batch_00001.safetensors",
        "manifest.json",
    ]
    assert _manifest(tmp_path / "a")["complete"] is False
    calls = _spy_generate(monkeypatch, model)
    resumed = sample_calibration(model, tokenizer, cache=tmp_path / "a", **kw)
    assert len(calls) == 2  # only the missing batches
    assert _manifest(tmp_path / "a")["complete"] is True
    assert resumed.sequences == reference.sequences
    assert resumed.stats is not None and resumed.stats.from_cache == 2
    # A lost batch file (e.g. a crash mid-write): regenerated from there, still identical.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "batch_00003.safetensors").unlink()
    again = sample_calibration(model, tokenizer, cache=tmp_path / "b", **kw)
    assert len(calls) == 3
    assert again.sequences == reference.sequences


def test_cache_refuses_other_arguments_or_model(model: Any, tokenizer: Any, tmp_path: Path) -> None:
    sample_calibration(model, tokenizer, seed=0, cache=tmp_path, **SMALL)
    with pytest.raises(ValueError, match="temperature"):
        sample_calibration(model, tokenizer, seed=0, cache=tmp_path, temperature=0.7, **SMALL)
    with pytest.raises(ValueError, match="seed"):
        sample_calibration(model, tokenizer, seed=1, cache=tmp_path, **SMALL)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(iter(other.parameters())).add_(1e-3)
    with pytest.raises(ValueError, match="another model"):
        sample_calibration(other, tokenizer, seed=0, cache=tmp_path, **SMALL)
    # dedupe and progress do not change what is generated: accepted.
    sample_calibration(model, tokenizer, seed=0, cache=tmp_path, **{**SMALL, "dedupe": False})


# ---------------------------------------------------------------------------------------------
# model handling and arguments


def test_encoder_raises_type_error() -> None:
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    with pytest.raises(TypeError, match="representative inputs"):
        sample_calibration(transformers.BertModel(config), num_samples=2, max_new_tokens=2)
    with pytest.raises(TypeError, match="cannot generate"):
        sample_calibration(torch.nn.Linear(2, 2), num_samples=2, max_new_tokens=2)


def test_train_eval_modes_are_restored(model: Any, tokenizer: Any) -> None:
    model.train()
    model.transformer.h[0].eval()  # mixed modes must come back as they were
    before = {name: m.training for name, m in model.named_modules()}
    try:
        sample_calibration(model, tokenizer, seed=0, **SMALL)
        assert {name: m.training for name, m in model.named_modules()} == before
    finally:
        model.eval()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"min_new_tokens": 99}, "min_new_tokens"),
        ({"prompts": []}, "prompts"),
    ],
)
def test_invalid_arguments(model: Any, tokenizer: Any, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sample_calibration(model, tokenizer, **{**SMALL, **kwargs})


def test_string_prompts_need_a_tokenizer(model: Any) -> None:
    with pytest.raises(TypeError, match="tokenizer"):
        sample_calibration(model, prompts=["hi"], **SMALL)
    with pytest.raises(TypeError, match="wrap a single"):
        sample_calibration(model, prompts=[1, 2], **SMALL)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# mix


def test_mix_normalizes_validates_and_flattens() -> None:
    a, b, c = [1], [2], [3]
    m = mix(a, b, weights=[1, 3])
    assert isinstance(m, CalibrationMix)
    assert m.sources == ((a, 0.25), (b, 0.75))
    assert mix(a, b).weights == (0.5, 0.5)
    nested = mix(m, c, weights=[2, 2])
    assert nested.sources == ((a, 0.125), (b, 0.375), (c, 0.5))
    assert mix(a, b, weights=[0, 1]).weights == (0.0, 1.0)
    for bad, match in [
        ([1], "2 loaders but 1"),
        ([1, -1], "non-negative"),
        ([1, float("nan")], "finite"),
        ([0, 0], "positive sum"),
        ([1, float("inf")], "finite"),
    ]:
        with pytest.raises(ValueError, match=match):
            mix(a, b, weights=bad)
    with pytest.raises(ValueError, match="at least one"):
        mix()
    with pytest.raises(TypeError, match="not iterable"):
        mix(a, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="preserve"):
        iter(m)


def test_calibration_samples_container() -> None:
    s = CalibrationSamples([[1, 2, 3], [1], [4, 5]], batch_size=2, pad_token_id=9)
    batches = list(s)
    assert len(s) == 2 and len(batches) == 2
    assert batches[0]["input_ids"].tolist() == [[1, 2, 3], [1, 9, 9]]
    assert batches[1]["attention_mask"].tolist() == [[1, 1]]
    assert s.device == torch.device("cpu")
    meta = s.to("meta")
    assert meta.sequences == s.sequences and next(iter(meta))["input_ids"].device.type == "meta"
    with pytest.raises(ValueError, match="at least one token"):
        CalibrationSamples([[]], batch_size=1, pad_token_id=0)


# ---------------------------------------------------------------------------------------------
# statistics: self-samples stand for the training distribution


def _conv1d_covariances(model: Any, batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Uncentered covariance of the inputs of every Conv1D, over non-pad tokens."""
    from transformers.pytorch_utils import Conv1D

    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    mask_holder: dict[str, Any] = {}

    def hook(name: str) -> Any:
        def pre(_module: Any, args: tuple) -> None:
            x = args[0][mask_holder["m"]].double()  # (tokens, features), pads removed
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return pre

    handles = [
        m.register_forward_pre_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, Conv1D)
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                mask_holder["m"] = batch["attention_mask"].bool()
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def _text_batches(tokenizer: Any, texts: list[str], max_len: int) -> list[dict[str, Any]]:
    docs = [d[:max_len] for d in _tiny_gpt2.encode_documents(tokenizer, texts)]
    return list(CalibrationSamples(docs, batch_size=16, pad_token_id=tokenizer.pad_token_id))


def test_self_samples_match_training_statistics_better_than_other_text(
    model: Any, tokenizer: Any
) -> None:
    s = sample_calibration(
        model, tokenizer, seed=0, num_samples=48, max_new_tokens=48, batch_size=16, progress=False
    )
    train_text = _tiny_gpt2.docstring_corpus()[::4][:48]
    ood_text = _tiny_gpt2.source_corpus()[:48]
    c_train = _conv1d_covariances(model, _text_batches(tokenizer, train_text, 49))
    c_self = _conv1d_covariances(model, list(s))
    c_ood = _conv1d_covariances(model, _text_batches(tokenizer, ood_text, 49))
    assert len(c_train) == 8  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    for name, ref in c_train.items():
        norm = torch.linalg.norm(ref)
        d_self = float(torch.linalg.norm(c_self[name] - ref) / norm)
        d_ood = float(torch.linalg.norm(c_ood[name] - ref) / norm)
        assert d_self < d_ood, (name, d_self, d_ood)


# ---------------------------------------------------------------------------------------------
# end to end


def _logit_drift(model: Any, handle: Any, task: dict, probe: dict) -> float:
    """Relative change of the logits on ``probe`` after one SGD step on ``task``."""
    opt = (
        handle.optimizer(torch.optim.SGD, lr=0.05)
        if handle is not None
        else torch.optim.SGD(model.parameters(), lr=0.05)
    )
    mask = probe["attention_mask"].bool()
    with torch.no_grad():
        before = model(**probe).logits[mask]
    model.train()
    labels = task["input_ids"].masked_fill(task["attention_mask"] == 0, -100)
    loss = model(**task, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()
    assert torch.isfinite(loss)
    with torch.no_grad():
        after = model(**probe).logits[mask]
    return float(torch.linalg.norm(after - before) / torch.linalg.norm(before))


def test_preserve_on_self_samples_gates_a_finetuning_step(model: Any, tokenizer: Any) -> None:
    rqt = pytest.importorskip("rqcore_torch")
    if not hasattr(rqt, "preserve"):
        pytest.skip("rqcore_torch.preserve is not available yet")
    samples = sample_calibration(
        model, tokenizer, seed=0, num_samples=8, max_new_tokens=24, batch_size=8, progress=False
    )
    probe = next(iter(samples))
    # The "task": Python source, far from the docstrings the model knows.
    task = _text_batches(tokenizer, _tiny_gpt2.source_corpus()[:8], 49)[0]
    gated = copy.deepcopy(model)
    handle = rqt.preserve(gated, samples, progress=False)  # no data set at all
    drift_gated = _logit_drift(gated, handle, task, probe)
    drift_plain = _logit_drift(copy.deepcopy(model), None, task, probe)
    assert 0 < drift_gated < 0.5 * drift_plain, (drift_gated, drift_plain)
    # A blend of self-samples and a real proxy set goes through the same entry point.
    blend = mix(samples, _text_batches(tokenizer, _train_text_slice(), 49), weights=[0.7, 0.3])
    rqt.preserve(copy.deepcopy(model), blend, progress=False)


def _train_text_slice() -> list[str]:
    return _tiny_gpt2.docstring_corpus()[1::8][:8]


# --- session 12 review: stop tokens, cache corruption and seeds, position limits, mix weights ------

# Three batches of 3, 3 and 1 samples.
CACHED = {"num_samples": 7, "max_new_tokens": 8, "batch_size": 3, "progress": False, "seed": 5}


@pytest.fixture(scope="module")
def cached_reference(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """A complete cache made with ``CACHED`` and the samples it holds."""
    root = tmp_path_factory.mktemp("cache") / "ref"
    samples = sample_calibration(tiny[0], tiny[1], cache=root, **CACHED)
    return root, samples.sequences


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
