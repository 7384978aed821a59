"""Shared test helpers: op cases, the masked research MoE, attack models, training configs."""
