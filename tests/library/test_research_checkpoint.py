"""Import of research-code checkpoints: research-layout masked models (tests/helpers/masked_moe.py) saved in the
research format load into our sparse models with identical logits and expert choices."""

from __future__ import annotations

import pytest
import torch
from helpers.masked_moe import ResearchResNetCifar, ResearchWRN, randomize_

from advmoe.deploy import load_research_checkpoint
from advmoe.deploy.research_checkpoint import convert_research_state_dict
from advmoe.models import create_model
from advmoe.nn import forward_with_aux

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def _research_checkpoint(model):
    router = model.router
    return {"state_dict": model.state_dict(), "router": router.state_dict(), "epoch": 7, "best_acc": 0.0}


def _compare(research, ours, x):
    with torch.no_grad():
        expected = research(x)
        scores = research.router(_normalised(research, x))
        logits, aux = forward_with_aux(ours, x)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    chosen = scores.argmax(1)
    for name, idx in aux.routing.items():
        assert torch.equal(idx[:, 0], chosen), name
    return chosen


def _center_router_(research, x):
    """Shifts the router's biases so that several experts win on x (otherwise routing is untested)."""
    with torch.no_grad():
        research.router.fc.bias -= research.router(_normalised(research, x)).mean(0)


def _normalised(model, x):
    norm = getattr(model, "normalize", None)
    if norm is None:
        return x
    return (x - norm.mean[None, :, None, None]) / norm.std[None, :, None, None]


def test_router_copies_are_in_the_research_state_dict():
    model = ResearchResNetCifar(0.25, 2)
    keys = model.state_dict().keys()
    assert "router.fc.weight" in keys and "layer1.0.conv1.router.fc.weight" in keys
    converted, normalize = convert_research_state_dict(model.state_dict())
    assert not any(".router." in k for k in converted) and normalize is None
    assert "router.layer3.2.conv2.weight" in converted


def test_resnet18_cifar_round_trip():
    # loading from a file (the research checkpoint format) is tested with advmoe.checkpoint.load_model in
    # tests/library/test_checkpoint.py; here the loaded dict goes straight to the converter
    torch.manual_seed(0)
    research = randomize_(ResearchResNetCifar(0.25, 2, normalize=(CIFAR_MEAN, CIFAR_STD))).eval()
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _center_router_(research, x)
    ckpt = _research_checkpoint(research)
    ours = load_research_checkpoint(ckpt, "resnet18_cifar_moe", 2, 0.25, 10, backend="reference")
    assert not ours.training and ours.normalize is not None
    assert len(_compare(research, ours, x).unique()) == 2
    again = create_model(**ours.config)
    assert type(again) is type(ours) and again.state_dict().keys() == ours.state_dict().keys()


def test_wrn_round_trip_reproduces_the_projection_quirk():
    torch.manual_seed(0)
    research = randomize_(ResearchWRN(28, 10, 0.1, 2), seed=3).eval()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    _center_router_(research, x)
    ours = load_research_checkpoint(_research_checkpoint(research), "wrn_28_10_cifar", 2, 0.1, 10, backend="reference")
    assert ours.config["preact_projection"] is False
    assert len(_compare(research, ours, x).unique()) == 2


def test_data_parallel_prefix_and_bare_state_dict():
    research = randomize_(ResearchResNetCifar(0.125, 3)).eval()
    x = torch.rand(6, 3, 16, 16)
    _center_router_(research, x)
    prefixed = {f"module.{k}": v for k, v in research.state_dict().items()}
    ours = load_research_checkpoint(prefixed, "resnet18_cifar", 3, 0.125, 10, backend="reference")
    assert len(_compare(research, ours, x).unique()) >= 2


def test_mismatched_checkpoint_names_the_keys():
    research = ResearchResNetCifar(0.25, 2)
    with pytest.raises(ValueError, match="does not fit"):
        load_research_checkpoint(_research_checkpoint(research), "resnet18_cifar_moe", 2, 0.5, 10)
    with pytest.raises(ValueError, match="unknown arch"):
        load_research_checkpoint(_research_checkpoint(research), "resnet19_cifar_moe", 2, 0.25, 10)
    with pytest.raises(TypeError, match="path_or_dict"):
        load_research_checkpoint(3, "resnet18_cifar_moe", 2, 0.25, 10)


def test_vgg_and_imagenet_resnet_key_layout():
    """Keys and shapes of the research layouts, as read from its model files (no research code run)."""
    vgg = create_model("vgg16_bn", num_experts=2, ratio=0.5).state_dict()
    assert vgg["features.0.weight"].shape == (32, 3, 3, 3)  # first conv dense, int(r*64)
    assert vgg["features.3.weight"].shape == (2 * 32, 32, 3, 3)  # MoE: E*w rows
    assert vgg["features.40.weight"].shape == (2 * 256, 256, 3, 3)
    assert vgg["classifier.0.weight"].shape == (256, 256 * 4) and vgg["classifier.4.weight"].shape == (10, 256)
    res = create_model("resnet18_imagenet", num_experts=2, ratio=0.5).state_dict()
    assert res["conv1.weight"].shape == (32, 3, 7, 7)
    assert res["layer2.0.downsample.0.weight"].shape == (2 * 64, 32, 1, 1)  # MoE downsample
    assert res["fc.weight"].shape == (10, 256)
    cif = create_model("resnet18_cifar", num_experts=2, ratio=0.5).state_dict()
    assert cif["conv1.weight"].shape == (64, 3, 3, 3)  # full-width dense stem
    assert cif["layer1.0.shortcut.0.weight"].shape == (32, 64, 1, 1)  # dense shortcut
    assert cif["layer1.0.conv1.weight"].shape == (2 * 32, 64, 3, 3)


def test_imported_model_trains_like_the_research_model():
    """Train-mode gradients (router through the straight-through mask, experts, BN) agree after import."""
    torch.manual_seed(0)
    research = randomize_(ResearchResNetCifar(0.125, 2)).eval()
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    _center_router_(research, x)
    ours = load_research_checkpoint(_research_checkpoint(research), "resnet18_cifar", 2, 0.125, 10, backend="reference")
    target = torch.arange(6) % 10
    for model in (research.train(), ours.train()):
        torch.nn.functional.cross_entropy(model(x), target).backward()
    theirs = dict(research.named_parameters(remove_duplicate=False))
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-4, msg=name)
    assert ours.router.fc.weight.grad.abs().sum() > 0
