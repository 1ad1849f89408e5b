"""Row routing of LoRA layers: each slot's rows see only its own adapter, whether the slots'
adapters run one by one or grouped into batched matmuls."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from personalize import routing as routing_module
from personalize.routing import DENOISER, BatchRouting, route_lora_layers


def lora_model(adapters: dict[str, int]) -> torch.nn.Module:
    """Two Linear layers with one LoRA adapter per name (name -> rank), B set away from 0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    for name, rank in adapters.items():
        model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank * 2, target_modules=["0", "1"]), model,
                                        adapter_name=name)
    for module in model.modules():
        if hasattr(module, "lora_B"):
            for linear in module.lora_B.values():
                torch.nn.init.normal_(linear.weight)
    return model


def alone(model: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The output of `name`'s adapter alone on x (peft's own forward with only it active)."""
    for module in model.modules():
        if hasattr(module, "set_adapter"):
            module.set_adapter(name)
    return model(x)


@pytest.mark.parametrize("rows", [[2, 2, 2], [1, 3, 2]], ids=["equal-rows-grouped", "unequal-rows-one-by-one"])
@pytest.mark.parametrize("shape", [(), (4,)], ids=["rows", "rows-by-tokens"])
def test_each_slots_rows_get_its_own_adapter_and_its_own_gradient(rows, shape, monkeypatch):
    grouped_calls = []
    grouped = routing_module._grouped_lora_delta
    monkeypatch.setattr(routing_module, "_grouped_lora_delta", lambda *a: grouped_calls.append(1) or grouped(*a))
    names = ["a", "b", "c"]
    model = lora_model({n: 2 for n in names})
    x = torch.randn(sum(rows), *shape, 6)
    expected, grads_alone, start = [], [], 0
    for name, n in zip(names, rows):  # the sum of squares is per row: each adapter's gradient is its rows'
        out = alone(model, name, x[start:start + n])
        grads_alone.append(torch.autograd.grad(out.square().sum(), model[0].lora_A[name].weight)[0])
        expected.append(out.detach())
        start += n
    expected = torch.cat(expected)

    routing = BatchRouting()
    route_lora_layers(model, routing, DENOISER)
    for module in model.modules():  # every adapter trains at once, as in a pack
        if hasattr(module, "lora_A"):
            for linear in [*module.lora_A.values(), *module.lora_B.values()]:
                linear.weight.requires_grad_(True)
    with routing.rows(DENOISER, [name for name, n in zip(names, rows) for _ in range(n)]):
        packed = model(x)
    grads_packed = torch.autograd.grad(packed.square().sum(), [model[0].lora_A[n].weight for n in names])

    assert len(grouped_calls) == (2 if len(set(rows)) == 1 else 0)  # both layers, or neither
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(grads_packed, grads_alone):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_adapters_of_different_ranks_are_routed_one_by_one():
    model = lora_model({"a": 2, "b": 4})
    x = torch.randn(4, 6)
    expected = torch.cat([alone(model, "a", x[:2]), alone(model, "b", x[2:])])
    routing = BatchRouting()
    route_lora_layers(model, routing, DENOISER)
    with routing.rows(DENOISER, ["a", "a", "b", "b"]):
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
