"""Training strategies: what one training step does with one batch.

=============  ===============================================================================================
strategy       one step
=============  ===============================================================================================
``pgd_at``     Madry PGD-AT: x_adv = PGD-CE(x); minimise CE(f(x_adv), y) over all parameters.
``trades``     TRADES: x_adv = argmax KL(f(x) || f(x_adv)); minimise CE(f(x), y) + beta * KL over all parameters.
``moe_at``     the same adversarial training on an MoE model, routers and experts updated jointly (the paper's
               baseline that fails to robustify MoE-CNNs); loss ``ce`` or ``trades``.
``advmoe``     ``router_loss=task``: per batch ``router_steps`` router updates (fresh adversarial examples against
               the current model, only router parameters change, router optimizer) then ``expert_steps`` expert
               updates (fresh adversarial examples against the model with the updated routers, only
               expert/backbone parameters change, expert optimizer); loss ``ce`` or ``trades``.
               ``router_loss=research`` (the research recipe, docs/training.md): expert updates FIRST (TRADES on
               the research attack), then a fresh research attack and the router update
               ``router_alpha * CE(s(x), y mod E) + beta * KL(s(x) || s(x_adv))``.
=============  ===============================================================================================

Every loss of ``moe_at`` and of the ``task`` AdvMoE steps adds ``balance_weight`` times the configured
balance loss (averaged over routers; for TRADES, over the clean and adversarial forward). Unless
``decay_unused_experts`` is set, the rows of an expert that got no sample in an update's forward receive no
weight decay in that update (the optimizers hold those parameters in a ``masked_decay`` group).
``Strategy.last_usage`` holds, after each step, the (E,) routing counts per MoE layer of the step's training
forward passes (clean and adversarial inputs of every update).

Adversarial examples are generated on the bare model (never through DDP) in ``train.attack_mode`` (``eval``
like the research code). Every loss is checked before its backward pass: a NaN or infinite loss (on any rank)
raises :class:`~advmoe.train.losses.NonFiniteLossError` before any parameter changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advmoe.attacks.research import research_attack
from advmoe.nn import is_moe, moe_layers
from advmoe.train.config import TrainConfig
from advmoe.train.distributed import DistInfo, all_reduce_sum, any_rank
from advmoe.train.forward import model_mode, only_trainable, split_parameters
from advmoe.train.losses import NonFiniteLossError, research_router_loss, trades_loss

__all__ = ["Strategy", "expert_row_parameters", "optimizer_groups"]


def expert_row_parameters(model: nn.Module) -> dict[int, tuple[str, int]]:
    """``id(param) -> (MoE layer name, expert width)`` for every MoE layer's weight and bias.

    Rows ``[e*w, (e+1)*w)`` of these parameters belong to expert e.
    """
    rows = {}
    for name, layer in moe_layers(model):
        for p in (layer.weight, layer.bias):
            if p is not None:
                rows[id(p)] = (name, layer.expert_width)
    return rows


def optimizer_groups(cfg: TrainConfig, model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameter groups that get their own optimizer: ``{"model": all}`` or ``{"router", "expert"}``.

    Raises:
        ValueError: ``moe_at`` or ``advmoe`` on a dense model.
    """
    if cfg.strategy in ("moe_at", "advmoe") and not is_moe(model):
        raise ValueError(
            f"train.strategy={cfg.strategy!r} needs an MoE model (set model.num_experts >= 2); "
            "use 'pgd_at' or 'trades' for a dense model"
        )
    if cfg.strategy != "advmoe":
        return {"model": list(model.parameters())}
    routers, experts = split_parameters(model)
    if not routers:
        raise ValueError("train.strategy='advmoe' needs router parameters, but the model has none")
    return {"router": routers, "expert": experts}


class Strategy:
    """One training step of any strategy (see the module docstring).

    Args:
        cfg: the ``train`` config section.
        model: the bare model (attacks run on it; its parameters are what the optimizers hold).
        forward: callable ``forward(x1, x2, ...)`` returning one ``(logits, balance, router_logits)`` per
            input; a :class:`~advmoe.train.forward.TrainForward`, possibly wrapped in DDP.
        optimizers: ``{"model": opt}`` or ``{"router": opt, "expert": opt}`` (from :func:`optimizer_groups`).
        dist: process-group information (NaN checks agree across ranks).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        forward: nn.Module,
        optimizers: dict[str, torch.optim.Optimizer],
        dist: DistInfo | None = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.forward = forward
        self.optimizers = optimizers
        self.dist = dist or DistInfo()
        self.groups = {name: [p for g in opt.param_groups for p in g["params"]] for name, opt in optimizers.items()}
        self.forward_module = getattr(forward, "module", forward)  # the TrainForward inside DDP
        self.expert_rows = expert_row_parameters(model)
        self.last_usage: dict[str, torch.Tensor] = {}
        if cfg.router_loss == "research" and any(layer.router is not None for _, layer in moe_layers(model)):
            raise ValueError(
                "the research recipe (train.router_loss='research') needs a model-level router "
                "(model.router='research'); this model has per-layer routers"
            )

    # adversarial examples -----------------------------------------------------------------------------------
    def attack(self, x: torch.Tensor, y: torch.Tensor, loss: str, router_targets=None) -> torch.Tensor:
        """Training adversarial examples (B, C, H, W) for ``x`` against the current model.

        ``loss`` picks the attack: ``ce`` (PGD on cross-entropy), ``trades`` (PGD on the TRADES KL) or
        ``research`` (the research code's TRADES-KL plus router-score KL against ``router_targets``).
        """
        a = self.cfg.attack
        if a.steps == 0 or a.eps == 0:
            return x.detach()
        from advmoe import attacks

        with model_mode(self.model, self.cfg.attack_mode == "train"):
            if loss == "research":
                return research_attack(self.model, x, a.eps, a.alpha, a.steps, router_targets=router_targets)
            if loss == "trades":
                return attacks.trades_pgd(self.model, x, a.eps, a.alpha, a.steps, norm=a.norm)
            return attacks.pgd(self.model, x, y, a.eps, a.alpha, a.steps, random_start=a.random_start, norm=a.norm)

    # losses -------------------------------------------------------------------------------------------------
    def task_loss(self, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, loss: str):
        """(scalar loss, (B, classes) adversarial logits) of the ``ce`` or ``trades`` objective, train mode."""
        bw = self.cfg.balance_weight
        if loss == "trades":
            (logits_nat, bal_nat, _), (logits_adv, bal_adv, _) = self.forward(x, x_adv)
            value = trades_loss(logits_nat, logits_adv, y, self.cfg.beta)
            if bw:
                value = value + bw * 0.5 * (bal_nat + bal_adv)
            return value, logits_adv
        ((logits_adv, bal_adv, _),) = self.forward(x_adv)
        value = F.cross_entropy(logits_adv, y)
        if bw:
            value = value + bw * bal_adv
        return value, logits_adv

    def research_router_loss(self, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor):
        """(scalar loss, adversarial logits) of the research code's router objective."""
        (_, _, routers_nat), (logits_adv, _, routers_adv) = self.forward(x, x_adv)
        loss = research_router_loss(routers_nat, routers_adv, y, self.cfg.router_alpha, self.cfg.beta)
        return loss, logits_adv

    # updates ------------------------------------------------------------------------------------------------
    def update(self, loss: torch.Tensor, group: str, device: torch.device) -> None:
        """Check ``loss`` on every rank, then backward and step the optimizer of ``group``.

        Raises:
            NonFiniteLossError: the loss is NaN or infinite on some rank (no parameter was changed).
        """
        bad = not bool(torch.isfinite(loss.detach()).all())
        if any_rank(bad, self.dist, device):
            value = loss.detach().float().item()
            raise NonFiniteLossError(
                f"{group} loss is not finite ({value}) on {'this' if bad else 'another'} rank; stopping before the "
                "update (lower the learning rate, check the data, or try train.deterministic=true to reproduce)"
            )
        self.model.zero_grad(set_to_none=True)
        loss.backward()
        usage = {k: v.clone() for k, v in getattr(self.forward_module, "usage", {}).items()}
        for name, counts in usage.items():
            self.last_usage[name] = self.last_usage[name] + counts if name in self.last_usage else counts
        self._masked_decay(group, usage, device)
        self.optimizers[group].step()

    def _masked_decay(self, group: str, usage: dict[str, torch.Tensor], device: torch.device) -> None:
        """Adds ``weight_decay * param`` to the gradient of the rows of experts that got samples this update."""
        decayed = [g for g in self.optimizers[group].param_groups if g.get("masked_decay", 0) > 0]
        if not decayed:
            return
        if self.dist.enabled:  # every rank must decay the same rows, so the replicas stay identical
            names = sorted(usage)
            total = all_reduce_sum(torch.stack([usage[n] for n in names]).to(device), self.dist).cpu()
            usage = dict(zip(names, total, strict=True))
        for g in decayed:
            for p in g["params"]:
                if p.grad is None or id(p) not in self.expert_rows:
                    continue
                layer, width = self.expert_rows[id(p)]
                counts = usage.get(layer)
                used = counts > 0 if counts is not None else torch.ones(p.shape[0] // width, dtype=torch.bool)
                rows = used.repeat_interleave(width).to(p.device).view(-1, *([1] * (p.dim() - 1)))
                p.grad.add_(p.detach() * rows.to(p.dtype), alpha=g["masked_decay"])

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One training step on a batch.

        Args:
            x: (B, C, H, W) training images in [0, 1] (already augmented), on the training device.
            y: (B,) int64 labels.

        Returns:
            ``{"loss", "adv_acc"}`` (and ``router_loss`` for AdvMoE): loss values and the accuracy on the
            training adversarial examples, as floats.
        """
        cfg = self.cfg
        self.last_usage = {}
        if cfg.strategy != "advmoe":
            x_adv = self.attack(x, y, cfg.loss)
            with model_mode(self.model, True):
                loss, logits = self.task_loss(x, x_adv, y, cfg.loss)
                self.update(loss, "model", x.device)
            return {"loss": loss.item(), "adv_acc": _accuracy(logits, y)}
        if cfg.router_loss == "research":
            return self._research_step(x, y)

        solo = not self.dist.enabled  # DDP needs the same parameters to require grads every step
        out: dict[str, float] = {}
        for _ in range(cfg.router_steps):
            x_adv = self.attack(x, y, cfg.loss)
            with model_mode(self.model, True), only_trainable(self.model, self.groups["router"], solo):
                loss, logits = self.task_loss(x, x_adv, y, cfg.loss)
                self.update(loss, "router", x.device)
            out = {"router_loss": loss.item(), "adv_acc": _accuracy(logits, y)}
        for _ in range(cfg.expert_steps):
            x_adv = self.attack(x, y, cfg.loss)
            with model_mode(self.model, True), only_trainable(self.model, self.groups["expert"], solo):
                loss, logits = self.task_loss(x, x_adv, y, cfg.loss)
                self.update(loss, "expert", x.device)
            out.update(loss=loss.item(), adv_acc=_accuracy(logits, y))
        out.setdefault("loss", out.get("router_loss", float("nan")))
        return out

    def _research_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """The research recipe (``train_moe.py`` lines 39-157): expert step(s), then router step(s).

        The clean router scores that both attacks keep close to are computed once per batch in train mode,
        before any update (research line 39); the router parameters do not change in the expert step, so
        the router step's clean scores, recomputed in train mode, have the same value.
        """
        cfg = self.cfg
        solo = not self.dist.enabled
        with torch.no_grad(), model_mode(self.model, True):
            ((_, _, targets),) = self.forward(x)
        targets = {k: v.detach() for k, v in targets.items()}
        out: dict[str, float] = {}
        for _ in range(cfg.expert_steps):
            x_adv = self.attack(x, y, "research", router_targets=targets)
            with model_mode(self.model, True), only_trainable(self.model, self.groups["expert"], solo):
                loss, logits = self.task_loss(x, x_adv, y, cfg.loss)
                self.update(loss, "expert", x.device)  # zero_grad first: no router gradient survives
            out.update(loss=loss.item(), adv_acc=_accuracy(logits, y))
        for _ in range(cfg.router_steps):
            x_adv = self.attack(x, y, "research", router_targets=targets)
            with model_mode(self.model, True), only_trainable(self.model, self.groups["router"], solo):
                loss, logits = self.research_router_loss(x, x_adv, y)
                self.update(loss, "router", x.device)  # zero_grad first: the expert step's router grads go
            out["router_loss"] = loss.item()
            out.setdefault("adv_acc", _accuracy(logits, y))
        out.setdefault("loss", out.get("router_loss", float("nan")))
        return out


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    if y.numel() == 0:
        return float("nan")
    return (logits.detach().argmax(1) == y).float().mean().item()
