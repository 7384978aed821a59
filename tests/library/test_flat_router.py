"""advmoe.deploy.FlatPerLayerRouter and the per-layer deployed form: bit-identical scores, fallbacks, save/load."""

import copy

import pytest
import torch

from advmoe.deploy import RoutedExpertConv2d, load_deployed, save_deployed, to_sparse
from advmoe.deploy.router_fold import FlatPerLayerRouter
from advmoe.models import create_model
from advmoe.nn import PerLayerRouter, forward_with_aux


def _routers(channels: int = 24, experts: int = 3, tracked: bool = True) -> tuple[PerLayerRouter, FlatPerLayerRouter]:
    torch.manual_seed(0)
    src = PerLayerRouter(channels, experts).eval()
    with torch.no_grad():
        src.fc.bias.copy_(0.1 * torch.randn(experts))
        norm = src.input_norm
        norm.running_mean.copy_(0.3 * torch.randn(channels))
        norm.running_var.copy_(0.5 + torch.rand(channels))
        norm.num_batches_tracked.fill_(5 if tracked else 0)
    flat = copy.deepcopy(src)
    flat.__class__ = FlatPerLayerRouter
    return src, flat


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_flat_router_scores_are_bit_identical(batch):
    src, flat = _routers()
    x = torch.randn(batch, 24, 5, 7)
    with torch.no_grad():
        assert torch.equal(flat(x), src(x))
    assert list(flat.state_dict()) == list(src.state_dict())


def test_flat_router_follows_changed_statistics():
    src, flat = _routers()
    x = torch.randn(5, 24, 4, 4)
    with torch.no_grad():
        flat(x)  # fills the cached running std
        for s in (src, flat):  # in place, as load_state_dict and calibration do
            s.input_norm.running_var.mul_(3.0)
            s.input_norm.running_mean.add_(0.5)
        assert torch.equal(flat(x), src(x))
        state = copy.deepcopy(src.state_dict())
        state["input_norm.running_var"] = torch.full((24,), 0.25)
        src.load_state_dict(state)
        flat.load_state_dict(state)
        assert torch.equal(flat(x), src(x))
        flat.input_norm.num_batches_tracked.zero_()  # never tracked again: the batch's own statistics
        src.input_norm.num_batches_tracked.zero_()
        assert torch.equal(flat(x), src(x))
    with torch.inference_mode():  # buffers made under inference_mode have no version counter: no caching
        src2, flat2 = _routers()
        flat2.input_norm.running_var = torch.full((24,), 2.0)
        src2.input_norm.running_var = torch.full((24,), 2.0)
        assert torch.equal(flat2(x), src2(x))


def test_flat_router_falls_back_where_the_short_path_does_not_apply():
    x = torch.randn(4, 24, 5, 5)
    src, flat = _routers(tracked=False)  # never-tracked statistics: the batch's own, as in the source
    with torch.no_grad():
        assert torch.equal(flat(x), src(x))
    src, flat = _routers()
    src.train()
    flat.train()
    out_src, out_flat = src(x), flat(x)  # train mode: batch statistics and running-estimate updates
    assert torch.equal(out_flat, out_src)
    assert torch.equal(flat.input_norm.running_mean, src.input_norm.running_mean)
    assert int(flat.input_norm.num_batches_tracked) == 6
    src.eval()
    flat.eval()
    with pytest.raises(ValueError, match=r"RouterInputNorm expects \(B, 24\) features"):
        flat(torch.randn(2, 23, 5, 5))


def _per_layer_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet10_mini", num_experts=2, ratio=0.25, router="per_layer", backend="reference")
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 32, 32))  # tracks the router norms' statistics, as training does
    return model.eval()


def test_layer_mode_uses_flat_routers_and_survives_save_load(tmp_path):
    model = _per_layer_model()
    deployed = to_sparse(model)
    layers = [m for m in deployed.modules() if isinstance(m, RoutedExpertConv2d)]
    assert layers and all(type(m.router) is FlatPerLayerRouter for m in layers)
    assert all(type(m.router) is PerLayerRouter for m in model.modules() if hasattr(m, "router") and m.router)
    x = torch.rand(7, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reloaded = load_deployed(save_deployed(deployed, tmp_path / "d.pt"))
    assert all(type(m.router) is FlatPerLayerRouter for m in reloaded.modules() if isinstance(m, RoutedExpertConv2d))
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(deployed(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(deployed(x[:1]), ref[:1], atol=1e-5, rtol=1e-5)
        assert torch.equal(reloaded(x), deployed(x))


def test_grouped_layers_keep_values_in_channels_last():
    model = _per_layer_model()
    deployed = to_sparse(model)
    x = torch.rand(9, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, aux = forward_with_aux(model, x)
        assert any(len(idx.unique()) > 1 for idx in aux.routing.values())  # some layer groups both experts
        ref = deployed(x)
        cl = copy.deepcopy(deployed).to(memory_format=torch.channels_last)
        out = cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _one_image_layers(deployed) -> list[RoutedExpertConv2d]:
    return [m for m in deployed.modules() if isinstance(m, RoutedExpertConv2d)]


def test_one_image_path_is_bit_identical_and_follows_weight_changes():
    model = _per_layer_model()
    deployed = to_sparse(model)
    general = copy.deepcopy(deployed)
    for layer in _one_image_layers(general):
        layer._one_image_plan = lambda: None  # forces the general path (router module, per-call slicing)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(deployed(x), general(x))
        assert all(layer._one_image_plan() is not None for layer in _one_image_layers(deployed))  # path taken
        for net in (deployed, general):  # in place: weights, head, router statistics
            for layer in _one_image_layers(net):
                layer.weight.mul_(1.5)
                layer.router.fc.bias.add_(torch.tensor([2.0, -2.0]))
                layer.router.input_norm.running_var.mul_(4.0)
                layer.router.input_norm.eps = 0.5
        assert torch.equal(deployed(x), general(x))
        for net in (deployed, general):  # replaced parameters
            for layer in _one_image_layers(net):
                layer.weight = torch.nn.Parameter(layer.weight.flip(0).clone())
        assert torch.equal(deployed(x), general(x))
        torch.testing.assert_close(deployed(x), deployed(x.expand(3, -1, -1, -1))[:1], atol=1e-5, rtol=1e-5)


def test_one_image_path_steps_aside_where_it_does_not_apply():
    model = _per_layer_model()
    deployed = to_sparse(model)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    layer = _one_image_layers(deployed)[0]
    with torch.no_grad():
        ref = model(x)
        layer.router.input_norm.num_batches_tracked.zero_()  # untracked norm: the source forward decides
        assert layer._one_image_plan() is None
        layer.router.input_norm.num_batches_tracked.fill_(1)
        assert layer._one_image_plan() is not None
        torch.testing.assert_close(deployed(x), ref, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match=r"RouterInputNorm expects \(B, 16\)"):  # the general path's error
            deployed.layer1(torch.rand(1, 5, 8, 8))
    with torch.inference_mode():
        made_here = copy.deepcopy(deployed)  # inference tensors: no version counter, so no cached plan
        assert _one_image_layers(made_here)[0]._one_image_plan() is None
        torch.testing.assert_close(made_here(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (6, 1, 4, 3), (6, 5, 1, 1)])
def test_gather_rows_keeps_the_memory_format(shape):
    from moe_kernels.geometry import gather_rows, output_memory_format

    index = torch.tensor([4, 0, 4, 2])
    for x in (torch.randn(shape), torch.randn(shape).contiguous(memory_format=torch.channels_last)):
        rows = gather_rows(x, index)
        assert torch.equal(rows, x.index_select(0, index))
        assert output_memory_format(rows) is output_memory_format(x)
    cl = torch.randn(6, 5, 4, 3).contiguous(memory_format=torch.channels_last)
    assert gather_rows(cl, index).is_contiguous(memory_format=torch.channels_last)
    assert not cl.index_select(0, index).is_contiguous(memory_format=torch.channels_last)  # why it exists
