"""A tiny GPT-2 and byte-level BPE tokenizer trained in-process on stdlib docstrings (test helper).

No download: the corpus is read from Python's own stdlib with :func:`inspect.getdoc`, the tokenizer is
trained with ``tokenizers`` and the model is built from a :class:`transformers.GPT2Config`. Training
(200 AdamW steps on 16x64 tokens, one thread) takes ~5-20 s depending on the machine's load;
:func:`load_or_train` caches the result on disk (keyed by the corpus, the settings and the library
versions) so later sessions load it instead.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import heapq
import inspect
import json
import os.path
import shutil
import string
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SETTINGS = {
    "vocab_size": 384,
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 2,
    "n_positions": 128,
    "steps": 200,
    "batch": 16,
    "seq": 64,
    "lr": 3e-3,
    "seed": 0,
}
_DOC_MODULES: tuple[ModuleType, ...] = (
    json,
    os.path,
    collections,
    textwrap,
    string,
    functools,
    shutil,
    inspect,
)


def docstring_corpus() -> list[str]:
    """Docstrings of the public functions and classes (and their methods) of a few stdlib modules."""
    docs: dict[str, None] = {}
    for mod in _DOC_MODULES:
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            members = [obj]
            if inspect.isclass(obj) and getattr(obj, "__module__", "") == mod.__name__:
                members += [m for n, m in sorted(vars(obj).items()) if inspect.isfunction(m)]
            for m in members:
                doc = inspect.getdoc(m)
                if doc and len(doc) >= 40:
                    docs[doc] = None
    return list(docs)


def source_corpus() -> list[str]:
    """Out-of-domain text: Python source of stdlib modules, in chunks of 20 lines."""
    chunks = []
    for mod in (heapq, textwrap):
        lines = inspect.getsource(mod).splitlines()
        chunks += ["\n".join(lines[i : i + 20]) for i in range(0, len(lines), 20)]
    return [c for c in chunks if len(c.strip()) >= 40]


def build_tokenizer(corpus: list[str]) -> Any:
    """Byte-level BPE trained on ``corpus``, wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SETTINGS["vocab_size"],
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )


def encode_documents(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Each text as ``[BOS] + ids + [EOS]``."""
    return [[tokenizer.bos_token_id, *tokenizer.encode(t), tokenizer.eos_token_id] for t in texts]


def _train(corpus: list[str]) -> tuple[Any, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    s = SETTINGS
    tokenizer = build_tokenizer(corpus)
    docs = encode_documents(tokenizer, corpus)
    stream = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    # Windows start at document starts, so the model learns to continue a BOS at position 0.
    starts = []
    pos = 0
    for d in docs:
        if pos + s["seq"] <= len(stream):
            starts.append(pos)
        pos += len(d)
    starts_t = torch.tensor(starts)
    torch.manual_seed(s["seed"])
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=s["n_layer"],
        n_embd=s["n_embd"],
        n_head=s["n_head"],
        n_positions=s["n_positions"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(s["seed"])
    offsets = torch.arange(s["seq"])
    model.train()
    # One thread: on a shared 2-core machine, two spinning threads per process run ~8x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _steps(model, opt, stream, starts_t, offsets, gen)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, tokenizer


def _steps(model: Any, opt: Any, stream: Any, starts_t: Any, offsets: Any, gen: Any) -> None:
    s = SETTINGS
    for step in range(s["steps"]):
        pick = starts_t[torch.randint(len(starts_t), (s["batch"],), generator=gen)]
        x = stream[pick[:, None] + offsets]
        lr = s["lr"] * min(1.0, (step + 1) / 30) * (1 - step / s["steps"]) + 1e-5
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _key(corpus: list[str]) -> str:
    import tokenizers
    import transformers

    h = hashlib.sha256()
    h.update(json.dumps(SETTINGS, sort_keys=True).encode())
    h.update("\x00".join(corpus).encode())
    h.update(f"{torch.__version__}|{transformers.__version__}|{tokenizers.__version__}".encode())
    return h.hexdigest()[:16]


def load_or_train(cache_root: Path) -> tuple[Any, Any]:
    """The trained (model, tokenizer), loaded from ``cache_root`` or trained and saved there."""
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    corpus = docstring_corpus()
    path = Path(cache_root) / f"tiny-gpt2-{_key(corpus)}"
    if (path / "done").exists():
        try:
            model = GPT2LMHeadModel.from_pretrained(path)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
            model.eval()
            return model, tokenizer
        except Exception:  # a stale or torn cache: retrain
            shutil.rmtree(path, ignore_errors=True)
    model, tokenizer = _train(corpus)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "done").touch()
    return model, tokenizer
