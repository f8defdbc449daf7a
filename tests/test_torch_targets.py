"""Target resolution: defaults, patterns, predicates, Conv1D, tied heads, PEFT LoRA."""

from __future__ import annotations

import pytest
import torch

from rqcore_torch import preserve
from rqcore_torch.targets import resolve_targets

transformers = pytest.importorskip("transformers")


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    return transformers.GPT2LMHeadModel(cfg)


def test_gpt2_conv1d_and_tied_head():
    model = _gpt2()
    targets = resolve_targets(model)
    names = [t.name for t in targets]
    assert "lm_head" not in names  # tied to the embedding
    attn = next(t for t in targets if t.name == "transformer.h.0.attn.c_attn")
    assert attn.kind == "conv1d" and attn.dim == 33 and attn.gated[0][3]  # transposed


def test_patterns_and_predicate():
    model = _gpt2()
    assert [t.name for t in resolve_targets(model, "*.mlp.*")] == [
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]
    pred = resolve_targets(model, lambda n, m: n.endswith("c_attn"))
    assert [t.name for t in pred] == ["transformer.h.0.attn.c_attn"]


def test_gpt2_gate_step_runs():
    model = _gpt2()
    ids = torch.randint(0, 100, (2, 6))
    with preserve(model, [{"input_ids": ids}], progress=False) as handle:
        opt = handle.optimizer(torch.optim.AdamW, lr=1e-3)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        assert 0 < handle.penalty().total < 1


def test_peft_lora_gates_lora_a():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    model = peft.get_peft_model(
        transformers.BertModel(cfg), peft.LoraConfig(target_modules=["query", "value"], r=4)
    )
    targets = resolve_targets(model)
    assert [t.kind for t in targets] == ["lora", "lora"]
    ids = torch.randint(0, 100, (2, 5))
    with preserve(model, [{"input_ids": ids}], method="nullspace", energy=0.9, progress=False) as h:
        gates = h.layer_gates()
        assert [g.name.split(".")[-2:] for g in gates] == [["lora_A", "default"]] * 2
        assert h.statistics.layers[targets[1].name].group == targets[0].name  # shared input
        opt = h.optimizer(torch.optim.AdamW, lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
            opt.step()
        assert h.penalty().total >= 0
