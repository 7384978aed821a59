"""Adversarial attacks on [0, 1] inputs, for any module returning logits (no torchattacks, no torchvision).

``pgd`` (L-inf / L2, CE, CW margin, DLR or any loss, restarts), ``trades_pgd`` (TRADES-KL inner
maximisation), ``research_attack`` (the research code's AdvMoE training attack: output KL plus
router-score KL), ``router_attack`` (maximise the change of an MoE model's routing), ``autoattack`` (own
APGD-CE + APGD-T, Croce & Hein 2020, followed by ``square_attack``, a black-box check, in the standard
version; ``autoattack_variant`` names a run), ``soft_routing`` (a context in which MoE layers mix their
experts with the router's softmax: a differentiable surrogate to attack), and ``check_evaluation_setup``
(honest-evaluation warnings). Every attack leaves the model's train/eval mode
and its parameters' ``requires_grad`` as found and writes no parameter ``.grad``.
"""

from advmoe.attacks.apgd import apgd, apgd_targeted
from advmoe.attacks.autoattack import autoattack, autoattack_variant
from advmoe.attacks.checks import EvaluationWarning, check_black_box, check_evaluation_setup, check_model_for_eval
from advmoe.attacks.losses import ce_loss, cw_margin_loss, dlr_loss, dlr_targeted_loss, kl_loss
from advmoe.attacks.pgd import pgd
from advmoe.attacks.research import research_attack
from advmoe.attacks.router import router_attack, routing_changes
from advmoe.attacks.soft_routing import calibrated_temperatures, soft_routing
from advmoe.attacks.square import square_attack
from advmoe.attacks.trades import trades_pgd

__all__ = [
    "EvaluationWarning",
    "apgd",
    "apgd_targeted",
    "autoattack",
    "autoattack_variant",
    "calibrated_temperatures",
    "ce_loss",
    "check_black_box",
    "check_evaluation_setup",
    "check_model_for_eval",
    "cw_margin_loss",
    "dlr_loss",
    "dlr_targeted_loss",
    "kl_loss",
    "pgd",
    "research_attack",
    "router_attack",
    "routing_changes",
    "soft_routing",
    "square_attack",
    "trades_pgd",
]
