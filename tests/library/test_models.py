"""The model zoo: registry loop, equivalence with the masked full-conv formulation, routing helpers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers.masked_moe import masked_twin_, randomize_

from advmoe.models import create_model, list_models
from advmoe.nn import (
    expert_parameters,
    forward_with_aux,
    frozen_routing,
    is_moe,
    moe_layers,
    num_pathways,
    router_parameters,
)

ZOO = [
    "resnet18_cifar",
    "resnet34_cifar",
    "resnet50_cifar",
    "resnet18_imagenet",
    "resnet50_imagenet",
    "wrn_28_10_cifar",
    "wrn_34_10_cifar",
    "vgg16_bn",
    "vgg16",
    "densenet_cifar",
    "densenet_imagenet",
    "resnet10_mini",
]


def _size(name):
    return 16 if ("imagenet" in name or "vgg" in name) else 8


def test_registry_lists_the_contract_names():
    assert set(ZOO) <= set(list_models())
    with pytest.raises(ValueError, match="known models: .*resnet18_cifar"):
        create_model("resnet19")


@pytest.mark.parametrize("num_experts", [None, 2])
@pytest.mark.parametrize("name", ZOO)
def test_every_model_runs_and_rebuilds_from_config(name, num_experts):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, num_experts=num_experts, ratio=0.25, backend="reference").eval()
    x = torch.rand(2, 3, _size(name), _size(name))
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    assert is_moe(model) == (num_experts == 2)
    json.dumps(model.config)
    again = create_model(**model.config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in again.state_dict().items()}


MASKED = [  # name, kwargs, image size, train mode
    ("resnet10_mini", {}, 16, True),
    ("resnet10_mini", {}, 16, False),
    ("resnet18_imagenet", {}, 32, False),
    ("vgg16_bn", {}, 16, False),
    ("vgg16", {}, 16, True),
    ("wrn_28_10_cifar", {"ratio": 0.1}, 8, True),
    ("densenet_cifar", {"depth": 10}, 8, False),
    ("densenet_imagenet", {"depth": 10}, 32, True),
    ("resnet50_cifar", {"ratio": 0.125}, 8, False),
]


@pytest.mark.parametrize(
    "name, kwargs, size, train", MASKED, ids=[f"{m[0]}-{'train' if m[3] else 'eval'}" for m in MASKED]
)
def test_moe_equals_masked_full_conv(name, kwargs, size, train):
    torch.manual_seed(0)
    args = {"num_experts": 3, "ratio": 0.25, "backend": "reference", **kwargs}
    model = randomize_(create_model(name, **args)).train(train)
    twin = masked_twin_(copy.deepcopy(model))
    x = torch.rand(5, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs", [{"router": "research"}, {"router": "per_layer"}, {"router": "per_layer", "top_k": 2}]
)
def test_gradients_match_masked_and_reach_routers(kwargs):
    torch.manual_seed(0)
    model = create_model("resnet10_mini", num_experts=3, ratio=0.5, backend="reference", **kwargs)
    model = randomize_(model).double().train()  # fp64: the routers' input standardisation amplifies rounding
    twin = masked_twin_(copy.deepcopy(model))
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(2))
    for m in (model, twin):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    routers = router_parameters(model)
    assert routers and sum(p.grad.abs().sum() for p in routers) > 0


def test_parameter_split_is_disjoint_and_complete():
    for kwargs in ({}, {"num_experts": 2}, {"num_experts": 2, "router": "per_layer"}):
        model = create_model("resnet10_mini", **kwargs)
        routers, experts = router_parameters(model), expert_parameters(model)
        ids = [id(p) for p in routers + experts]
        assert len(ids) == len(set(ids)) == len(list(model.parameters()))
        assert bool(routers) == ("num_experts" in kwargs)


def test_forward_with_aux_and_frozen_routing():
    torch.manual_seed(0)
    model = randomize_(create_model("resnet10_mini", num_experts=2, ratio=0.5, backend="reference")).eval()
    x = torch.rand(6, 3, 16, 16)
    logits, aux = forward_with_aux(model, x)
    names = [n for n, _ in moe_layers(model)]
    assert list(aux.routing) == names and list(aux.router_logits) == ["router"]
    assert aux.router_logits["router"].shape == (6, 2) and aux.balance_loss.dim() == 0
    chosen = aux.router_logits["router"].argmax(1)
    assert all(torch.equal(idx[:, 0], chosen) for idx in aux.routing.values())
    with frozen_routing(model, aux.routing):
        torch.testing.assert_close(model(x), logits)
        _, inside = forward_with_aux(model, x)
        assert inside.router_logits == {}
    for e in range(2):
        with frozen_routing(model, e):
            _, inside = forward_with_aux(model, x)
        assert all((idx == e).all() for idx in inside.routing.values())
    assert model.routing_frozen is False and all(layer.frozen_expert_idx is None for _, layer in moe_layers(model))
    with pytest.raises(ValueError, match="pathway"), frozen_routing(model, 2):
        pass
    with pytest.raises(KeyError, match="layer1.0.conv1"), frozen_routing(model, {}):
        pass


def test_frozen_routing_stops_router_gradients():
    model = create_model("resnet10_mini", num_experts=2, ratio=0.5, backend="reference")
    with frozen_routing(model, 1):
        model(torch.rand(2, 3, 16, 16)).sum().backward()
    assert all(p.grad is None for p in router_parameters(model))


def test_per_layer_aux_and_pathways():
    model = create_model("resnet10_mini", num_experts=2, router="per_layer", backend="reference")
    _, aux = forward_with_aux(model, torch.rand(3, 3, 16, 16))
    assert set(aux.router_logits) == {f"{n}.router" for n, _ in moe_layers(model)}
    assert num_pathways(model) is None
    assert num_pathways(create_model("resnet10_mini", num_experts=3)) == 3
    assert num_pathways(create_model("resnet10_mini")) == 1
    _, dense_aux = forward_with_aux(create_model("resnet10_mini"), torch.rand(2, 3, 16, 16))
    assert dense_aux.routing == {} and dense_aux.balance_loss.item() == 0.0


def test_normalisation_inside_the_model():
    torch.manual_seed(0)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    plain = create_model("resnet10_mini", num_experts=2, backend="reference").eval()
    normed = create_model("resnet10_mini", num_experts=2, normalize=(mean, std), backend="reference").eval()
    normed.load_state_dict(plain.state_dict(), strict=False)
    x = torch.rand(3, 3, 16, 16)
    z = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(normed(x), plain(z))
    assert "normalize.mean" in normed.state_dict()


def test_widths_dense_slim_and_moe():
    slim = create_model("resnet18_cifar", ratio=0.5).state_dict()
    assert slim["conv1.weight"].shape == (32, 3, 3, 3) and slim["layer4.1.conv2.weight"].shape == (256, 256, 3, 3)
    moe = create_model("resnet18_cifar", num_experts=4, ratio=0.5, top_k=2).state_dict()
    assert moe["layer4.1.conv2.weight"].shape == (4 * 256, 512, 3, 3) and moe["linear.weight"].shape == (10, 512)
    wrn = create_model("wrn_28_10_cifar", num_experts=2, ratio=0.5).state_dict()
    assert wrn["block1.layer.0.convShortcut.weight"].shape == (2 * 80, 8, 1, 1)
    dn = create_model("densenet_cifar", num_experts=2, ratio=0.5).state_dict()
    assert dn["features.denseblock1.denselayer1.conv2.weight"].shape == (2 * 6, 24, 3, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 0.0}, "ratio"),
        ({"num_experts": 2, "top_k": 3}, "top_k"),
        ({"router": "global"}, "router"),
        ({"normalize": ([0.5], [0.2])}, "normalize"),
        ({"num_classes": 0}, "num_classes"),
        ({"ratio": 0.001}, "ratio"),
    ],
)
def test_create_model_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("resnet10_mini", **kwargs)


def test_input_errors():
    model = create_model("resnet10_mini", normalize=([0.5] * 3, [0.2] * 3))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="channels"):
        model(torch.rand(1, 1, 16, 16))


def test_moe_model_exports():
    model = create_model("resnet10_mini", num_experts=2, ratio=0.5, backend="reference").eval()
    x = torch.rand(2, 3, 16, 16)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))


class _Wrapper(torch.nn.Module):
    """Stands in for DistributedDataParallel: the model under ``module``."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, x):
        return self.module(x)


def test_aux_inside_a_wrapper_keeps_the_router_key():
    wrapped = _Wrapper(create_model("resnet10_mini", num_experts=2, backend="reference"))
    _, aux = forward_with_aux(wrapped, torch.rand(2, 3, 16, 16))
    assert list(aux.router_logits) == ["router"] and "module.layer1.0.conv1" in aux.routing
    with frozen_routing(wrapped, aux.routing):
        wrapped(torch.rand(2, 3, 16, 16))
