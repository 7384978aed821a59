"""advmoe.deploy: BatchNorm folding, to_sparse equivalence over the registry, save/load, torch.export."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advmoe.bench.models import balance_router
from advmoe.deploy import (
    CapturedModel,
    GroupedMoE,
    PathwayMoE,
    RoutedExpertConv2d,
    fold_router,
    load_deployed,
    load_research_checkpoint,
    routing_agreement,
    save_deployed,
    to_sparse,
)
from advmoe.deploy.check import compare_deployed
from advmoe.deploy.fold import find_conv_bn_pairs, fold_bn
from advmoe.deploy.graphs import check_static_input
from advmoe.models import create_model, list_models
from advmoe.nn import SparseMoEConv2d, moe_layers
from advmoe.nn.routers import RouterInputNorm

NORM = ([0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
# Ratios that keep every registry model small enough for a CPU test while keeping its structure.
SMALL_RATIO = {
    "wrn_28_10_cifar": 0.0625,
    "wrn_34_10_cifar": 0.0625,
    "resnet50_imagenet": 0.0625,
    "resnet50_cifar": 0.0625,
    "densenet_cifar": 0.125,
    "densenet_imagenet": 0.125,
}


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
        if isinstance(m, RouterInputNorm):  # as after training: fixed statistics, batch-independent outputs
            n = m.running_mean.numel()
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.num_batches_tracked.fill_(1)
    return model.eval()


def _moe(name: str, **kwargs) -> nn.Module:
    args = {"num_experts": 2, "ratio": SMALL_RATIO.get(name, 0.25), "normalize": NORM, "backend": "reference"}
    args.update(kwargs)
    torch.manual_seed(0)
    return _randomize_bn(create_model(name, **args))


def _images(batch: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> None:
    err = (a - b).abs()
    scale = max(1.0, b.abs().max().item())
    assert err.max().item() <= atol * scale, f"max diff {err.max().item():.3g}, mean {err.mean().item():.3g}"


def test_fold_bn_matches_conv_then_bn():
    conv, bn = nn.Conv2d(3, 6, 3, padding=1), _randomize_bn(nn.BatchNorm2d(3))
    weight, bias = fold_bn(conv.weight, conv.bias, bn, repeat=2)  # BN over 3 channels shared by 2 "experts"
    x = torch.randn(2, 3, 7, 5)
    ref = conv(x).view(2, 2, 3, 7, 5)
    ref = torch.stack([bn(ref[:, e]) for e in range(2)], 1).view(2, 6, 7, 5)
    _assert_close(F.conv2d(x, weight, bias, padding=1), ref, atol=1e-5)
    with pytest.raises(ValueError, match="BatchNorm has 3 channels"):
        fold_bn(conv.weight, conv.bias, bn, repeat=1)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.r1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c3, self.b3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = F.relu(self.b2(self.c2(self.r1(self.b1(self.c1(x))))))
        z = self.c3(y)
        return self.b3(z) + z  # c3's output has two consumers: not foldable


def test_find_conv_bn_pairs_follows_dataflow():
    pairs = find_conv_bn_pairs(_Toy().eval(), torch.randn(2, 3, 8, 8), (nn.Conv2d,))
    assert [(p.conv, p.bn, p.relu) for p in pairs] == [("c1", "b1", "r1"), ("c2", "b2", None)]


@pytest.mark.parametrize("name", list_models())
def test_to_sparse_matches_every_registry_model(name):
    model = _moe(name)
    size = 64 if "imagenet" in name else 32
    x = _images(2, size)  # balanced: one sample per pathway
    balance_router(model, x)
    deployed = to_sparse(model, mode="pathway", example_input=x[:2])
    assert isinstance(deployed, PathwayMoE) and deployed.deploy_mode == "pathway"
    assert len(set(deployed.route(x).tolist())) == 2, "the test batch must use both pathways"
    for net in deployed.pathways:
        assert not any(isinstance(m, SparseMoEConv2d) for m in net.modules())
        if name.startswith(
            ("resnet", "vgg")
        ):  # conv -> BN everywhere (WRN/DenseNet are pre-activation: BN -> ReLU -> conv)
            assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    with torch.no_grad():
        _assert_close(deployed(x), model(x))
        _assert_close(deployed(x[1:]), model(x[1:]))  # single-sample fast path


@pytest.mark.parametrize(
    "kwargs", [{"router": "per_layer"}, {"num_experts": 3, "top_k": 2}, {"num_experts": 3}], ids=str
)
def test_to_sparse_layer_mode(kwargs):
    model = _moe("resnet10_mini", **kwargs)
    x = _images(5)
    deployed = to_sparse(model, mode="layer" if "router" not in kwargs else "auto", example_input=x[:2])
    assert deployed.deploy_mode == "layer"
    fast = [m for m in deployed.modules() if isinstance(m, RoutedExpertConv2d)]
    assert bool(fast) == (kwargs.get("router") == "per_layer")
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert n_bn < sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        _assert_close(deployed(x), model(x))


def test_auto_keeps_pathway_unless_grouped_is_clearly_faster():
    from advmoe.deploy.to_sparse import _pick_form

    assert _pick_form({"pathway": 10.0, "grouped": 9.7}) == "pathway"  # 3% faster: within the margin
    assert _pick_form({"pathway": 10.0, "grouped": 9.0}) == "grouped"
    assert _pick_form({"pathway": 9.0, "grouped": 10.0}) == "pathway"


def test_to_sparse_dense_model_folds_batchnorm():
    torch.manual_seed(0)
    model = _randomize_bn(create_model("resnet10_mini", ratio=0.5, normalize=NORM))
    deployed = to_sparse(model)
    assert deployed.deploy_mode == "dense"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    x = _images(3)
    with torch.no_grad():
        _assert_close(deployed(x), model(x))


def test_to_sparse_leaves_source_unchanged_and_rejects_bad_modes():
    model = _moe("resnet10_mini")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    to_sparse(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.bn1.__class__ is nn.BatchNorm2d
    with pytest.raises(ValueError, match="mode must be one of"):
        to_sparse(model, mode="fast")
    with pytest.raises(ValueError, match="model-level router"):
        to_sparse(_moe("resnet10_mini", router="per_layer"), mode="pathway")
    for kwargs, why in (({"router": "per_layer"}, "per-layer routers"), ({"num_experts": 3, "top_k": 2}, "top_k=2")):
        with pytest.raises(ValueError, match=f"{why}.*use mode='layer'"):
            to_sparse(_moe("resnet10_mini", **kwargs), mode="grouped")
    with pytest.raises(ValueError, match="auto_batch"):
        to_sparse(model, auto_batch=0)


@pytest.mark.parametrize("mode", ["pathway", "grouped", "layer"])
def test_to_sparse_empty_batch_and_bad_input(mode):
    deployed = to_sparse(_moe("resnet10_mini"), mode=mode)
    with torch.no_grad():
        assert deployed(_images(0)).shape == (0, 10)
    with pytest.raises(ValueError, match="B, C, H, W"):
        deployed(torch.rand(3, 32, 32))


def _research_format(model: nn.Module) -> dict:
    """Our model's weights in the research code's checkpoint layout (router copied into every MoE layer)."""
    state = dict(model.state_dict())
    router = {k[len("router.") :]: v for k, v in state.items() if k.startswith("router.")}
    for name, _ in moe_layers(model):
        state.update({f"{name}.router.{k}": v.clone() for k, v in router.items()})
    return {"state_dict": state, "router": router, "epoch": 3}


def test_to_sparse_research_checkpoint():
    source = _moe(
        "resnet18_cifar", ratio=0.125, normalize=([0.49, 0.48, 0.45], [0.25, 0.24, 0.26]), router_norm=False
    )  # the research code's router has no input norm
    x = _images(4)
    balance_router(source, x)
    # the checkpoint file format itself is tested in tests/library/test_checkpoint.py
    ckpt = _research_format(source)
    model = load_research_checkpoint(ckpt, "resnet18_cifar_moe", num_experts=2, ratio=0.125, num_classes=10)
    deployed = to_sparse(model, example_input=x[:2])
    assert deployed.deploy_mode in ("pathway", "grouped")  # auto: whichever was faster here
    with torch.no_grad():
        _assert_close(deployed(x), source(x))


@pytest.mark.parametrize(
    "kwargs, mode", [({}, "pathway"), ({}, "grouped"), ({"router": "per_layer"}, "layer")], ids=str
)
def test_save_load_round_trip(tmp_path, kwargs, mode):
    model = _moe("resnet10_mini", **kwargs)
    x = _images(4)
    balance_router(model, x)
    deployed = to_sparse(model, mode=mode)
    path = save_deployed(deployed, tmp_path / "sub" / "deployed.pt")
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == "advmoe-deployed" and blob["deploy_mode"] == deployed.deploy_mode
    loaded = load_deployed(path)
    assert loaded.deploy_mode == deployed.deploy_mode and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), deployed(x))


def test_load_deployed_rejects_other_files(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a deployed advmoe model"):
        load_deployed(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="save_deployed needs"):
        save_deployed(nn.Linear(2, 2), tmp_path / "y.pt")


@pytest.mark.parametrize("mode", ["pathway", "grouped", "layer"])
def test_torch_export_round_trip(tmp_path, mode):
    model = _moe("resnet10_mini")
    x = _images(6)
    balance_router(model, x)
    deployed = to_sparse(model, mode=mode)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(deployed, (x,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, tmp_path / "deployed.pt2")
    loaded = torch.export.load(tmp_path / "deployed.pt2").module()
    with torch.no_grad():
        for inputs in (x, x[:3], x[2:3]):
            _assert_close(loaded(inputs), model(inputs))


@pytest.mark.parametrize(
    "name", ["resnet18_cifar", "resnet18_imagenet", "vgg16_bn", "wrn_28_10_cifar", "densenet_cifar"]
)
def test_grouped_mode_matches_source(name):
    model = _moe(name)
    size = 64 if "imagenet" in name else 32
    x = _images(5, size)
    balance_router(model, x[:4])
    deployed = to_sparse(model, mode="grouped", example_input=x[:2])
    assert isinstance(deployed, GroupedMoE) and deployed.deploy_mode == "grouped" and deployed.router_folded
    assert not any(
        isinstance(m, SparseMoEConv2d) and type(m).__name__ != "GroupedExpertConv2d" for m in deployed.modules()
    )
    if name.startswith(("resnet", "vgg")):
        assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert len(set(deployed.route(x).tolist())) == 2
    with torch.no_grad():
        for inputs in (x, x[1:2], x[[1, 1, 1]]):  # mixed batch, one sample, one expert for the whole batch
            report = compare_deployed(model, deployed, inputs)
            assert report["ok"] and report["mismatched"] == 0, report


def test_auto_mode_times_pathway_and_grouped_and_says_why():
    model = _moe("resnet10_mini")
    deployed = to_sparse(model, auto_batch=4)
    assert deployed.deploy_mode in ("pathway", "grouped")
    assert re.match(
        rf"auto: {deployed.deploy_mode} (was faster|is kept \(grouped not 5% faster\)) on cpu at B=4",
        deployed.deploy_reason,
    )
    assert "pathway" in deployed.deploy_reason and "grouped" in deployed.deploy_reason
    assert " on cpu at B=64 (" in to_sparse(model).deploy_reason  # default: timed at a serving batch of 64
    layer = to_sparse(_moe("resnet10_mini", router="per_layer"))
    assert layer.deploy_mode == "layer" and "per-layer routers" in layer.deploy_reason


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_per_layer_fast_form_matches_op_form(batch):
    model = _moe("resnet10_mini", router="per_layer")
    x = _images(batch, seed=batch)
    deployed = to_sparse(model)
    op_form = to_sparse(model)
    for m in op_form.modules():
        if isinstance(m, RoutedExpertConv2d):
            m.__class__ = RoutedExpertConv2d.__mro__[1]  # FusedMoEConv2d: the sparse op
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), op_form(x), atol=1e-5, rtol=1e-5)
        report = compare_deployed(model, deployed, x)
    assert report["ok"] and report["mismatched"] == 0, report


def test_router_fold_agreement_clean_and_pgd():
    """Folding the research router's BatchNorms keeps >= 99.9% of argmax decisions on clean and PGD inputs."""
    from advmoe.attacks.pgd import pgd

    model = _moe("resnet10_mini", ratio=0.25)
    clean = _images(1200, seed=3)
    balance_router(model, clean[:200])
    xn = model.normalize(clean)
    folded = fold_router(model.router, xn[:2])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.router.modules())  # source untouched
    y = torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(0))
    adv = pgd(model, clean[:256], y, eps=8 / 255, alpha=2 / 255, steps=5, generator=torch.Generator().manual_seed(1))
    for inputs in (clean, adv):
        stats = routing_agreement(model.router, folded, model.normalize(inputs))
        assert stats["agreement"] >= 0.999, stats
        assert stats["max_score_diff"] < 1e-4, stats
    deployed = to_sparse(model, mode="pathway")
    with torch.no_grad():
        for inputs in (clean[:64], adv[:64]):
            report = compare_deployed(model, deployed, inputs)
            assert report["ok"], report  # logits unchanged except near-tie routing, which is counted


def test_compare_deployed_counts_near_ties():
    model = _moe("resnet10_mini")
    x = _images(6)
    balance_router(model, x)
    deployed = to_sparse(model, mode="pathway")
    with torch.no_grad():
        scores = model.router(model.normalize(x))
        tied = int((scores[:, 1] - scores[:, 0]).abs().argmin())
        deployed.router.fc.bias[1] += 2 * (scores[tied, 0] - scores[tied, 1])  # flip the closest sample only
        report = compare_deployed(model, deployed, x, noise=1e9)
        assert report["mismatched"] >= 1 and report["near_ties"] == report["mismatched"] and report["ok"]
        strict = compare_deployed(model, deployed, x, noise=0.0)
        assert not strict["ok"] and strict["near_ties"] == 0


def test_captured_model_checks_inputs_without_a_gpu():
    x = _images(4)
    check_static_input(x, (4, 3, 32, 32), torch.float32, torch.device("cpu"))
    for bad, match in ((x[:3], "shape"), (x.double(), "dtype"), ([1], "tensor")):
        with pytest.raises(ValueError, match=match):
            check_static_input(bad, (4, 3, 32, 32), torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="device"):
        check_static_input(x, (4, 3, 32, 32), torch.float32, torch.device("meta"))
    deployed = to_sparse(_moe("resnet10_mini"), mode="pathway")
    with pytest.raises(ValueError, match="needs a CUDA model"):
        CapturedModel(deployed, x)


class _FakeGraphModel(CapturedModel):
    """CapturedModel whose 'graph' is an eager call writing into the static output (tests the buffer logic)."""

    def _capture(self, warmup):
        self.graph = "fake"
        with torch.no_grad():
            return self.model(self.static_input)

    def _replay(self):
        with torch.no_grad():
            self.static_output.copy_(self.model(self.static_input))


def test_captured_model_replays_from_static_buffers():
    model = _moe("resnet10_mini")
    x = _images(4)
    balance_router(model, x)
    captured = _FakeGraphModel(to_sparse(model, mode="pathway"), x)
    other = _images(4, seed=9)
    with torch.no_grad():
        first, second = captured(x), captured(other)
        _assert_close(second, model(other))  # fresh input copied in, not the capture-time buffer
        _assert_close(first, model(x))  # outputs are copies: the second call did not overwrite the first
    with pytest.raises(ValueError, match="captured shape"):
        captured(x[:2])


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["pathway", "grouped", "dense"])
def test_cuda_graph_capture_matches_eager(mode):
    from advmoe.deploy import capture

    if mode == "dense":
        torch.manual_seed(0)
        model = _randomize_bn(create_model("resnet10_mini", ratio=0.5, normalize=NORM)).cuda()
    else:
        model = _moe("resnet10_mini").cuda()
    x = _images(8).cuda()
    if mode != "dense":
        balance_router(model, x)
    deployed = to_sparse(model, mode=mode if mode != "dense" else "auto", example_input=x[:2])
    captured = capture(deployed, 8, torch.float32, channels_last=True)
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        _assert_close(captured(xc), model(x))
    with pytest.raises(ValueError, match="dtype"):
        captured(xc.half())
    with pytest.raises(ValueError, match="device"):
        captured(xc.cpu())


def test_sync_free_capture_forms_match_eager_forms():
    """The forms used while a CUDA graph is captured (all experts / pathways, select per sample) are exact."""
    model = _moe("resnet10_mini")
    x = _images(6)
    balance_router(model, x)
    deployed = to_sparse(model, mode="pathway")
    with torch.no_grad():
        choice = deployed.route(x)
        xn = deployed.normalize(x)
        _assert_close(deployed._select_forward(xn, choice), deployed(x), atol=1e-6)
    layer = next(
        m for m in to_sparse(_moe("resnet10_mini", router="per_layer")).modules() if isinstance(m, RoutedExpertConv2d)
    )
    feats = torch.randn(5, layer.in_channels, 9, 9)
    with torch.no_grad():
        choice = layer.router(feats).argmax(1)
        rows = [layer._expert_conv(feats[i : i + 1], int(choice[i])) for i in range(5)]
        _assert_close(layer._select_conv(feats, choice), torch.cat(rows), atol=1e-5)
    grouped = to_sparse(model, mode="grouped")
    with torch.no_grad():
        eager = grouped(x)
        grouped.groups.choice = grouped.route(x)
        try:
            _assert_close(grouped.network(grouped.normalize(x)), eager, atol=1e-5)
        finally:
            grouped.groups.choice = None


def test_convert_checkpoint_reports_mode_reason_and_near_ties(tmp_path):
    from advmoe.checkpoint import ResearchSpec
    from advmoe.cli.convert import convert_checkpoint

    source = _moe(
        "resnet18_cifar", ratio=0.125, normalize=([0.49, 0.48, 0.45], [0.25, 0.24, 0.26]), router_norm=False
    )  # the research code's router has no input norm
    balance_router(source, _images(8, seed=0))
    torch.save(_research_format(source), tmp_path / "research.pth")
    path = str(tmp_path / "research.pth")
    _, deployed, report = convert_checkpoint(path, mode="grouped", research=ResearchSpec("resnet18_cifar", ratio=0.125))
    assert report["mode"] == "grouped" and report["reason"] == "grouped: requested"
    assert report["near_ties"] == 0 and report["max_rel_diff"] <= 1e-4 and report["argmax_agree"]


@pytest.mark.parametrize("mode", ["pathway", "grouped"])
def test_routed_once_forms_route_like_the_source_and_reject_bad_input(mode):
    model = _moe("resnet10_mini").eval()
    x = _images(4)
    deployed = to_sparse(model, mode=mode, example_input=x[:2])
    with torch.no_grad():
        expected = model.router(model.normalize(x)).argmax(1)
        assert torch.equal(deployed.route(x), expected)
    for bad in (x[0], "images"):
        with pytest.raises(ValueError, match=r"input must be a \(B, C, H, W\) image tensor"):
            deployed.route(bad)
        with pytest.raises(ValueError, match=r"input must be a \(B, C, H, W\) image tensor"):
            deployed(bad)
