"""Robustness evaluation: SA, RA under PGD and AutoAttack, routing robustness, expert usage.

``evaluate(model, data, cfg) -> dict`` is the entry point; ``EvalConfig`` holds the settings
(``load_eval_config`` reads one from YAML with ``key=value`` overrides) and
``format_result`` / ``summarize`` turn a result into a readable report or a flat row.
"""

from advmoe.eval.batches import iter_batches
from advmoe.eval.config import EVALUATION_VERSION, KNOWN_ATTACKS, EvalConfig, load_eval_config
from advmoe.eval.evaluate import evaluate
from advmoe.eval.metrics import Tally, correct, make_attack, run_attack
from advmoe.eval.report import format_result, markdown_table, mean_std, summarize
from advmoe.eval.routing_metrics import UsageCounter, routing_of, routing_unchanged

__all__ = [
    "EVALUATION_VERSION",
    "KNOWN_ATTACKS",
    "EvalConfig",
    "Tally",
    "UsageCounter",
    "correct",
    "evaluate",
    "format_result",
    "iter_batches",
    "load_eval_config",
    "make_attack",
    "markdown_table",
    "mean_std",
    "routing_of",
    "routing_unchanged",
    "run_attack",
    "summarize",
]
