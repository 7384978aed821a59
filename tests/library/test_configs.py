"""Config files and config validation: every shipped YAML loads; unknown keys list the known ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from advmoe._config import load_yaml
from advmoe.data import list_datasets
from advmoe.models import list_models
from advmoe.train import ExperimentConfig, load_experiment_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
# What every config resolved to before the configs shared bases (generated at commit f4b9b24 from the then
# self-contained files): "file" is the YAML mapping (``advmoe eval --config`` reads its ``eval`` section),
# "resolved" the ``ExperimentConfig.to_dict()`` that ``advmoe train --config`` runs.
RESOLVED = json.loads((Path(__file__).resolve().parents[1] / "data" / "resolved_configs.json").read_text())


def test_the_configs_exist():
    names = {p.stem for p in CONFIGS}
    for required in ("digits_at", "digits_trades", "digits_moe_at", "digits_advmoe"):
        assert required in names
    for ds in ("cifar10", "cifar100"):
        for arch in ("resnet18", "wrn28_10", "vgg16_bn", "densenet"):
            assert {f"{ds}_{arch}_at", f"{ds}_{arch}_advmoe"} <= names
    assert any(n.startswith("tinyimagenet") for n in names) and any(n.startswith("imagenet") for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_names_known_model_and_dataset(path):
    cfg = load_experiment_config(str(path))
    assert cfg.model.name in list_models()
    assert cfg.data.name in list_datasets()
    if cfg.train.strategy in ("moe_at", "advmoe"):
        assert cfg.model.num_experts and cfg.model.num_experts >= 2
    if not path.stem.startswith("digits"):  # the research-code defaults
        t = cfg.train
        assert (t.epochs, t.batch_size, t.optimizer.lr, t.optimizer.momentum) == (100, 128, 0.1, 0.9)
        assert t.optimizer.weight_decay == 5e-4 and t.optimizer.schedule == "cosine"
        assert t.attack.eps == pytest.approx(8 / 255) and t.attack.alpha == pytest.approx(5 / 255)
        assert t.attack.steps == 2 and t.eval_attack.alpha == pytest.approx(2 / 255)


def test_every_recorded_config_still_exists():
    assert len(RESOLVED) == 26 and set(RESOLVED) <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("name", sorted(RESOLVED))
def test_config_resolves_as_before(name):
    path = CONFIGS[0].parent / name
    assert load_yaml(path)["eval"] == RESOLVED[name]["file"]["eval"]
    assert load_experiment_config(str(path)).to_dict() == RESOLVED[name]["resolved"]


def test_configs_extend_a_base_and_stay_small():
    for path in CONFIGS:
        assert path.read_text().count("extends: base/") == 1, path.name
        assert len(path.read_text().splitlines()) <= 25, path.name


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_deep_merges_over_the_base_relative_to_the_file(tmp_path):
    _write(
        tmp_path, "bases/root.yaml", "seed: 1\ntrain: {epochs: 9, attack: {eps: 0.5, steps: 3}}\neval: {pgd_steps: 7}\n"
    )
    _write(tmp_path, "bases/mid.yaml", "extends: root.yaml\ntrain: {attack: {steps: 4}}\n")
    leaf = _write(tmp_path, "leaf.yaml", "extends: bases/mid.yaml\nseed: 2\ntrain: {epochs: 3}\n")
    data = load_yaml(leaf)
    assert data == {"seed": 2, "train": {"epochs": 3, "attack": {"eps": 0.5, "steps": 4}}, "eval": {"pgd_steps": 7}}
    cfg = load_experiment_config(str(leaf), ["train.attack.eps=0.25"])
    assert (cfg.seed, cfg.train.epochs, cfg.train.attack.steps, cfg.train.attack.eps) == (2, 3, 4, 0.25)
    assert cfg.eval.pgd_steps == 7


def test_extends_a_missing_base_names_it(tmp_path):
    leaf = _write(tmp_path, "leaf.yaml", "extends: nowhere.yaml\nseed: 2\n")
    with pytest.raises(ValueError, match=r"extends: 'nowhere.yaml' in .*leaf.yaml.* does not exist"):
        load_experiment_config(str(leaf))


@pytest.mark.parametrize("chain", [["a.yaml"], ["a.yaml", "b.yaml"], ["a.yaml", "b.yaml", "c.yaml"]])
def test_extends_cycle_is_reported(tmp_path, chain):
    for here, there in zip(chain, chain[1:] + chain[:1], strict=True):
        _write(tmp_path, here, f"extends: {there}\nseed: 1\n")
    with pytest.raises(ValueError, match=r"extends cycle: .*a.yaml"):
        load_yaml(tmp_path / chain[0])


@pytest.mark.parametrize("value", ["5", "''", "[a.yaml]", "{x: 1}"])
def test_extends_must_be_a_path(tmp_path, value):
    leaf = _write(tmp_path, "leaf.yaml", f"extends: {value}\n")
    with pytest.raises(ValueError, match="extends in .* must be a path to a YAML file"):
        load_yaml(leaf)


def test_defaults_are_the_research_code_defaults():
    t = ExperimentConfig().train
    assert (t.epochs, t.batch_size, t.beta, t.router_alpha, t.attack.steps) == (100, 128, 6.0, 6.0, 2)
    assert t.attack.eps == pytest.approx(8 / 255) and t.attack.alpha == pytest.approx(5 / 255)
    assert t.router_optimizer.lr == t.optimizer.lr == 0.1 and t.optimizer.schedule == "cosine"


def test_overrides_parse_values_and_create_sections():
    cfg = load_experiment_config(None, ["train.epochs=3", "train.attack.eps=0.1", "model.num_experts=4", "seed=5"])
    assert (cfg.train.epochs, cfg.train.attack.eps, cfg.model.num_experts, cfg.seed) == (3, 0.1, 4, 5)
    assert cfg.train.attack.steps == 2  # untouched sibling keeps its default


@pytest.mark.parametrize(
    "override, known",
    [
        ("train.epoch=3", "epochs"),
        ("optimiser.lr=1", "train"),
        ("train.attack.step=1", "steps"),
        ("eval.pgd_step=2", "pgd_steps"),
    ],
)
def test_unknown_keys_list_the_known_ones(override, known):
    with pytest.raises(ValueError, match=rf"unknown key.*known keys: .*'{known}'"):
        load_experiment_config(None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.strategy=adv", "train.strategy must be one of"),
        ("train.loss=mse", "train.loss must be one of"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("train.optimizer.name=lamb", "optimizer.name must be one of"),
        ("train.attack.norm=l1", "attack.norm must be one of"),
        ("train.router_loss=research", "only applies to train.strategy='advmoe'"),
        ("model.normalize=imagenet", "model.normalize must be"),
        ("data.max_train_samples=0", "max_train_samples"),
        ("train=5", "must be a mapping"),
        ("train.epochs", "must look like section.key=value"),
    ],
)
def test_bad_values_raise_clear_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_experiment_config(None, [override])


def test_trades_strategy_insists_on_its_loss():
    with pytest.raises(ValueError, match="always uses loss 'trades'"):
        load_experiment_config(None, ["train.strategy=trades", "train.loss=ce"])


def test_config_roundtrips_through_a_plain_dict():
    cfg = load_experiment_config(None, ["train.strategy=advmoe", "model.num_experts=2"])
    again = ExperimentConfig.from_dict(cfg.to_dict())
    assert again == cfg
