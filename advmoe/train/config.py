"""Training configuration: typed dataclasses for every section of a config file.

A config file (YAML) has the sections ``model``, ``data``, ``train``, ``eval`` and the top-level keys
``seed`` and ``device``. Unknown keys anywhere raise a ``ValueError`` listing the known ones.

Defaults and their sources. "Research code" is the public implementation of the AdvMoE paper
(OPTML-Group/Robust-MoE-CNN, ``args.py``, ``train_moe.py``, ``utils/``):

=====================================  ============  ==============================================
setting                                default       source
=====================================  ============  ==============================================
train.attack.eps (L-inf)               8/255         research code ``--epsilon``; paper threat model
train.attack.alpha                     5/255         research code ``--step-size``
train.attack.steps                     2             research code ``--num-steps``
train.attack_mode                      ``eval``      research code generates attacks in eval mode
train.optimizer / router_optimizer     SGD           research code ``--optimizer sgd``
  .lr                                  0.1           research code ``--lr`` (also the router's: its
                                                     ``--router-lr`` is parsed but never used)
  .momentum                            0.9           research code ``--momentum``
  .weight_decay                        5e-4          research code ``--wd`` (all parameters)
  .schedule                            cosine        research code ``--lr-schedule cosine`` (both groups)
train.epochs                           100           research code ``--epochs``
train.batch_size                       128           research code ``--batch-size``
train.beta (TRADES)                    6.0           research code ``--beta``; TRADES paper
train.router_alpha (research recipe)   6.0           research code ``--alpha`` (weight of CE(router, y mod E))
train.eval_attack                      PGD-10, 2/255 research code ``--num-steps-test``/``--step-size-test``
seed                                   1234          research code ``--seed``
=====================================  ============  ==============================================

Two deliberate differences: the cosine schedule is evaluated per optimisation step (the research code
sets it once per epoch, from ``(epoch - 1) / epochs``), and every loss is computed from logits with
``log_softmax`` on both sides (the research code's KL target underflows; its router goes NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from advmoe._config import apply_overrides, from_dict, load_yaml, to_dict
from advmoe.eval.config import EvalConfig

__all__ = [
    "STRATEGIES",
    "AttackConfig",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "OptimizerConfig",
    "TrainConfig",
    "load_experiment_config",
]

STRATEGIES = ("pgd_at", "trades", "moe_at", "advmoe")
ROUTERS = ("research", "per_layer", "image")  # advmoe.models.common.ROUTERS (not imported: keeps this module light)
BALANCE_LOSSES = ("entropy", "switch")  # advmoe.nn.routing.BALANCE_LOSSES
GATE_SCORES = ("softmax", "logits")  # advmoe.nn.routing.GATE_SCORES
_DEFAULT_LOSS = {"pgd_at": "ce", "trades": "trades", "moe_at": "ce", "advmoe": "ce"}


def _check_choice(where: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{where} must be one of {list(choices)}, got {value!r}")


@dataclass
class ModelConfig:
    """Arguments of ``advmoe.models.create_model`` (``num_classes`` and ``in_channels`` come from the data).

    Attributes:
        name: registry name, e.g. ``resnet18_cifar`` (see ``advmoe.models.list_models()``).
        num_experts: E; None or 1 gives the dense model.
        ratio: width ratio r of each expert (and of the dense model).
        top_k: experts per sample.
        router: ``research`` (the research code's ResNet-20 router on the image), ``image`` (a cheap two-conv
            router on the image; both drive every MoE layer) or ``per_layer``.
        router_norm: routers standardise their pooled features so routing starts balanced (default true);
            false is the research code's router architecture exactly.
        gate_score: what the straight-through gate's gradient flows into: ``softmax`` (default; bounded, keeps
            MoE adversarial training finite) or ``logits`` (the research code's ``GetMask``; the research recipe).
        normalize: ``dataset`` (the dataset's mean/std from ``advmoe.data.dataset_info``), None (no
            normalisation), or ``[mean, std]`` lists; applied inside the model (inputs stay in [0, 1]).
        backend: sparse-op backend (``auto`` picks the fastest available).
        kwargs: extra keyword arguments for the model builder.
    """

    name: str = "resnet18_cifar"
    num_experts: int | None = None
    ratio: float = 1.0
    top_k: int = 1
    router: str = "research"
    router_norm: bool = True
    gate_score: str = "softmax"
    normalize: str | list | None = "dataset"
    backend: str = "auto"
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_choice("model.router", self.router, ROUTERS)
        if not isinstance(self.router_norm, bool):
            raise ValueError(f"model.router_norm must be true or false, got {self.router_norm!r}")
        _check_choice("model.gate_score", self.gate_score, GATE_SCORES)
        if isinstance(self.normalize, str) and self.normalize != "dataset":
            raise ValueError(f"model.normalize must be 'dataset', None or [mean, std], got {self.normalize!r}")


@dataclass
class DataConfig:
    """Dataset and augmentation.

    Attributes:
        name: ``advmoe.data`` dataset name (``digits`` needs no download).
        root: dataset folder (None: the dataset's default).
        kwargs: extra keyword arguments for ``advmoe.data.build_dataset`` (e.g. ``size``, ``channels``).
        augment: random crop with padding (+ flip) on training batches.
        crop_padding: padding of the random crop (CIFAR convention: 4).
        flip: random horizontal flip (off for digits).
        num_workers: DataLoader worker processes.
        test_split: split used for evaluation.
        max_train_samples: train on the first this many samples only (None: all); for smoke runs.
    """

    name: str = "digits"
    root: str | None = None
    kwargs: dict = field(default_factory=dict)
    augment: bool = True
    crop_padding: int = 4
    flip: bool = True
    num_workers: int = 0
    test_split: str = "test"
    max_train_samples: int | None = None

    def __post_init__(self) -> None:
        if self.crop_padding < 0 or self.num_workers < 0:
            raise ValueError("data.crop_padding and data.num_workers must be >= 0")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"data.max_train_samples must be >= 1 or None, got {self.max_train_samples}")


@dataclass
class AttackConfig:
    """A PGD attack used during training (or for the per-epoch evaluation).

    Attributes:
        eps: budget (L-inf on [0, 1] images by default).
        alpha: step size.
        steps: iterations (0: no attack, clean training).
        norm: ``linf`` or ``l2``.
        random_start: uniform random start in the eps-ball (TRADES uses its own small Gaussian start).
    """

    eps: float = 8 / 255
    alpha: float = 5 / 255
    steps: int = 2
    norm: str = "linf"
    random_start: bool = True

    def __post_init__(self) -> None:
        _check_choice("attack.norm", self.norm, ("linf", "l2"))
        if self.eps < 0 or self.alpha < 0 or self.steps < 0:
            raise ValueError(f"attack eps/alpha/steps must be >= 0, got {self.eps}, {self.alpha}, {self.steps}")


@dataclass
class OptimizerConfig:
    """One optimizer and its learning-rate schedule (evaluated per step from the global step count).

    Attributes:
        name: ``sgd`` or ``adam``.
        lr: peak learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay on all parameters of the group.
        nesterov: SGD Nesterov momentum.
        schedule: ``cosine`` (lr * (1 + cos(pi t / T)) / 2), ``step`` (x0.1 at 75% and 90% of training,
            the research code's step schedule), or ``constant``.
        warmup_epochs: linear warm-up length in epochs (may be fractional).
    """

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("optimizer.name", self.name, ("sgd", "adam"))
        _check_choice("optimizer.schedule", self.schedule, ("cosine", "step", "constant"))
        if self.lr < 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("optimizer lr, weight_decay and warmup_epochs must be >= 0")


@dataclass
class TrainConfig:
    """The training loop and its strategy.

    Attributes:
        strategy: ``pgd_at`` (Madry PGD-AT), ``trades``, ``moe_at`` (AT on an MoE model, routers and experts
            updated jointly), ``advmoe`` (alternating router and expert steps).
        loss: ``ce`` (PGD-AT loss) or ``trades``; None takes the strategy's default (``trades`` for the
            ``trades`` strategy, else ``ce``). ``pgd_at`` and ``trades`` only accept their own.
        epochs: training epochs.
        batch_size: global batch size (split across processes under torchrun).
        beta: TRADES trade-off (weight of the KL term).
        router_loss: AdvMoE router-step loss: ``task`` (the same loss as the expert step; router step first,
            then the expert step) or ``research`` (the research recipe, see docs/training.md: expert step
            first, then a fresh attack and a router step minimising ``router_alpha * CE(s(x), y mod E) +
            beta * KL(softmax s(x) || softmax s(x_adv))`` for the model-level router's scores s; both attacks
            maximise the output KL plus the router-score KL; computed stably). Needs ``model.router=research``.
        router_alpha: weight of the routing supervision CE(s(x), y mod E) in the research router step
            (research code ``--alpha``); the router-score KL there is weighted by ``beta``, as in the research code.
        router_steps: router updates per batch (AdvMoE), each with fresh adversarial examples.
        expert_steps: expert updates per batch (AdvMoE), each with fresh adversarial examples.
        balance_loss: load-balancing term added to every loss that trains routers, averaged over the routers:
            ``entropy`` (``1 - H(mean softmax) / log E``, default) or ``switch`` (``E * sum_e f_e P_e``); applied
            identically by ``moe_at`` and ``advmoe`` (not by the research router step, whose ``y mod E``
            supervision balances the experts).
        balance_weight: its weight (>= 0; 0 switches it off, as in the research code).
        decay_unused_experts: false (default): an expert that received no samples in an update's forward
            pass gets no weight decay on its rows of that layer's weight and bias in that update (weight
            decay would otherwise shrink a never-chosen expert towards zero and make a collapse permanent);
            true: plain weight decay on every parameter (the research code).
        attack: training attack.
        attack_mode: model mode while generating training attacks: ``eval`` (research code) or ``train``.
        optimizer: optimizer of all parameters (joint strategies) or of the experts/backbone (AdvMoE).
        router_optimizer: optimizer of the router parameters (AdvMoE).
        eval_attack: PGD used for the per-epoch RA (and the best-RA checkpoint).
        eval_samples: test samples used for the per-epoch SA/RA (None: all).
        eval_every_epochs: evaluate every this many epochs (and always after the last).
        save_every_steps: also checkpoint every this many steps (0: only at epoch ends); enables exact
            mid-epoch resume.
        log_every_steps: write a step record to the JSON-lines log every this many steps.
        max_steps: stop after this many global steps (None: run all epochs).
        deterministic: deterministic algorithms (``torch.use_deterministic_algorithms``) and cuDNN settings.
        min_free_mb: free space required in the output directory before training starts.
        progress: show a tqdm progress bar.
    """

    strategy: str = "pgd_at"
    loss: str | None = None
    epochs: int = 100
    batch_size: int = 128
    beta: float = 6.0
    router_loss: str = "task"
    router_alpha: float = 6.0
    router_steps: int = 1
    expert_steps: int = 1
    balance_loss: str = "entropy"
    balance_weight: float = 0.1
    decay_unused_experts: bool = False
    attack: AttackConfig = field(default_factory=AttackConfig)
    attack_mode: str = "eval"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    router_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    eval_attack: AttackConfig = field(default_factory=lambda: AttackConfig(alpha=2 / 255, steps=10))
    eval_samples: int | None = 1000
    eval_every_epochs: int = 1
    save_every_steps: int = 0
    log_every_steps: int = 10
    max_steps: int | None = None
    deterministic: bool = False
    min_free_mb: float = 100.0
    progress: bool = True

    def __post_init__(self) -> None:
        _check_choice("train.strategy", self.strategy, STRATEGIES)
        if self.loss is None:
            self.loss = _DEFAULT_LOSS[self.strategy]
        _check_choice("train.loss", self.loss, ("ce", "trades"))
        if self.strategy in ("pgd_at", "trades") and self.loss != _DEFAULT_LOSS[self.strategy]:
            raise ValueError(
                f"train.strategy={self.strategy!r} always uses loss {_DEFAULT_LOSS[self.strategy]!r}; "
                f"use strategy 'moe_at' or 'advmoe' to choose the loss (got loss={self.loss!r})"
            )
        _check_choice("train.router_loss", self.router_loss, ("task", "research"))
        _check_choice("train.balance_loss", self.balance_loss, BALANCE_LOSSES)
        weight = self.balance_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or math.isnan(weight) or weight < 0:
            raise ValueError(f"train.balance_weight must be a number >= 0, got {weight!r}")
        if not math.isfinite(weight):
            raise ValueError(f"train.balance_weight must be finite, got {weight!r}")
        _check_choice("train.attack_mode", self.attack_mode, ("eval", "train"))
        if self.router_loss == "research" and self.strategy != "advmoe":
            raise ValueError("train.router_loss='research' only applies to train.strategy='advmoe'")
        if self.router_loss == "research" and self.attack.norm != "linf":
            raise ValueError("train.router_loss='research' uses the research code's L-inf attack; set attack.norm=linf")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "eval_every_epochs": self.eval_every_epochs}
        for name, value in positive.items():
            if int(value) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {value}")
        if self.router_steps < 0 or self.expert_steps < 0 or self.router_steps + self.expert_steps == 0:
            raise ValueError("train.router_steps and train.expert_steps must be >= 0 and not both 0")
        for name in ("save_every_steps", "log_every_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1 or None, got {self.max_steps}")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ValueError(f"train.eval_samples must be >= 1 or None, got {self.eval_samples}")


@dataclass
class ExperimentConfig:
    """A whole run: model, data, training, evaluation, seed and device (``auto``: CUDA if available)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 1234
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.train.router_loss == "research" and self.model.router != "research":
            raise ValueError(
                f"the research recipe (train.router_loss='research') needs a model-level router: set "
                f"model.router='research' (got model.router={self.model.router!r}); per-layer routers train with "
                "train.router_loss='task'"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON/checkpoint-safe)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ExperimentConfig:
        """Build from a nested dict; unknown keys raise ``ValueError`` listing the known ones."""
        return from_dict(cls, data, "config")


def load_experiment_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML config (or start from defaults) and apply ``section.key=value`` overrides.

    Args:
        path: YAML file, or None for the defaults.
        overrides: strings such as ``"train.epochs=2"``; values are parsed as YAML.

    Returns:
        The validated :class:`ExperimentConfig`.
    """
    data = load_yaml(path) if path else {}
    return ExperimentConfig.from_dict(apply_overrides(data, overrides))
