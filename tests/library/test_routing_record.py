"""advmoe.nn.record_routing: the explicit context MoE layers report their routing to, and Normalize's new home."""

from __future__ import annotations

import threading

import pytest
import torch

from advmoe.models import create_model
from advmoe.nn import RoutedModel, forward_with_aux, moe_layers, record_routing
from advmoe.nn.routing_record import report_routing


def _per_layer_model():
    torch.manual_seed(0)
    return create_model("resnet10_mini", num_experts=2, ratio=0.5, router="per_layer", backend="reference").eval()


def test_record_routing_collects_each_layers_experts_and_router():
    model = _per_layer_model()
    x = torch.rand(3, 3, 16, 16)
    with record_routing() as recorder:
        model(x)
    _, aux = forward_with_aux(model, x)
    for name, layer in moe_layers(model):
        record = recorder.get(layer)
        assert torch.equal(record.expert_idx, aux.routing[name])
        assert not record.expert_idx.requires_grad
        assert torch.equal(record.router.logits, aux.router_logits[f"{name}.router"])
        assert record.router.expert_idx.shape == (3, 1)
    assert recorder.get(model) is None  # no model-level router: the model reports nothing


def test_nothing_is_recorded_outside_a_context_and_no_attribute_is_written():
    model = _per_layer_model()
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    report_routing(model, expert_idx=torch.zeros(1, 1, dtype=torch.int64))  # no active context: a no-op
    forward_with_aux(model, torch.rand(2, 3, 16, 16))
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before


def test_nested_contexts_see_only_their_own_reports():
    model = _per_layer_model()
    layer = moe_layers(model)[0][1]
    with record_routing() as outer:
        with record_routing() as inner:
            model(torch.rand(2, 3, 16, 16))
        assert inner.get(layer) is not None and outer.get(layer) is None
        report_routing(layer, expert_idx=torch.ones(2, 1, dtype=torch.int64))
    assert outer.get(layer).router is None and torch.equal(outer.get(layer).expert_idx, torch.ones(2, 1).long())


def test_another_threads_forward_is_not_recorded():
    model = _per_layer_model()
    with record_routing() as recorder:
        worker = threading.Thread(target=model, args=(torch.rand(2, 3, 16, 16),))
        worker.start()
        worker.join()
    assert all(recorder.get(layer) is None for _, layer in moe_layers(model))


def test_model_level_router_reports_on_the_model():
    torch.manual_seed(0)
    model = create_model("resnet10_mini", num_experts=2, ratio=0.5, router="image", backend="reference").eval()
    x = torch.rand(4, 3, 16, 16)
    with record_routing() as recorder:
        model(x)
    record = recorder.get(model)
    assert record.router is not None and record.expert_idx is None
    for _, layer in moe_layers(model):  # every layer follows the model-level choice and reports it
        assert torch.equal(recorder.get(layer).expert_idx, record.router.expert_idx)
        assert recorder.get(layer).router is None


def test_normalize_lives_in_models_common_and_routed_model_takes_a_module():
    from advmoe.models.common import Normalize, make_normalize
    from advmoe.nn import Normalize as exported

    assert exported is Normalize
    norm = make_normalize(([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]))
    assert torch.allclose(norm(torch.ones(1, 3, 2, 2)), torch.full((1, 3, 2, 2), 2.0))
    assert make_normalize(None) is None
    assert RoutedModel(normalize=norm).normalize is norm
    with pytest.raises(ValueError, match="normalize must be an nn.Module"):
        RoutedModel(normalize=([0.5], [0.25]))
    model = create_model("resnet10_mini", normalize=([0.1, 0.2, 0.3], [0.5, 0.5, 0.5]))
    assert isinstance(model.normalize, Normalize)
    assert torch.allclose(model.normalize.mean, torch.tensor([0.1, 0.2, 0.3]))
