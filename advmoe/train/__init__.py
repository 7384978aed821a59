"""Adversarial training: PGD-AT, TRADES, MoE-AT and AdvMoE in one resumable, distributed loop.

``train(cfg, out_dir, resume=False)`` runs an :class:`ExperimentConfig` (``load_experiment_config`` reads
one from YAML with ``section.key=value`` overrides); ``load_trained_model(path)`` rebuilds a trained model.
"""

from advmoe.train.config import (
    STRATEGIES,
    AttackConfig,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
    load_experiment_config,
)
from advmoe.train.losses import NonFiniteLossError, research_router_loss, trades_loss
from advmoe.train.strategies import Strategy, optimizer_groups
from advmoe.train.trainer import CHECKPOINT_FORMAT, build_model, load_trained_model, train

__all__ = [
    "CHECKPOINT_FORMAT",
    "STRATEGIES",
    "AttackConfig",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "NonFiniteLossError",
    "OptimizerConfig",
    "Strategy",
    "TrainConfig",
    "build_model",
    "load_experiment_config",
    "load_trained_model",
    "optimizer_groups",
    "research_router_loss",
    "train",
    "trades_loss",
]
