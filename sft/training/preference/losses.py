"""The preference losses, by name: each a function from a batch's log-probabilities to a loss per record.

A loss reads a Scored batch: [records, 2] summed log-probabilities of each record's two answers
under the trained model (``policy``) and, where it needs one, under the reference model, with the
answers' token counts. Column 0 is the chosen answer, column 1 the rejected one; for KTO's
unpaired examples, column 0 is the example's completion and column 1 the mismatched completion
its KL term scores (sft.training.preference.collate). The trainer averages the losses over the
records of a micro-batch.

Each entry of LOSSES carries what the rest of the package asks of a loss: its help text (``sft
dpo --help`` lists them), the options it reads besides ``beta`` (any other loss-specific option
left at its default, or the run is refused before anything loads), whether it needs the reference
model (a reference-free loss skips the reference pass entirely) and whether it trains on pairs or
on unpaired examples, and the implicit reward its metrics log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sft.config.dpo import DPOSettings
from sft.errors import ConfigError


@dataclass(frozen=True)
class Scored:
    """What a loss reads of a batch: [records, 2] tensors (see the module docstring)."""

    policy: torch.Tensor
    """Summed log-probabilities of each answer under the trained model."""
    tokens: torch.Tensor
    """Each answer's token count."""
    reference: torch.Tensor | None = None
    """The same under the reference model; None for a reference-free loss."""
    desirable: torch.Tensor | None = None
    """[records] bool: each unpaired example's label; None for pairs."""


LossFunction = Callable[[Scored, DPOSettings], torch.Tensor]


@dataclass(frozen=True)
class PreferenceLoss:
    name: str
    help: str
    losses: LossFunction
    """[records] the loss of each record."""
    rewards: LossFunction
    """[records, 2] the implicit reward of each answer, for the metrics."""
    needs_reference: bool
    paired: bool
    """True: trains on preference pairs; False: on unpaired examples (a file of pairs is split)."""
    options: tuple[str, ...] = ()
    """The loss-specific settings (LOSS_OPTIONS) it reads."""

    def check(self, settings: DPOSettings) -> None:
        """Refuse a loss-specific option set for a loss that does not read it: it would be ignored."""
        for option in LOSS_OPTIONS:
            default = _DEFAULTS[option]
            if option not in self.options and getattr(settings, option) != default:
                users = [loss.name for loss in LOSSES.values() if option in loss.options]
                raise ConfigError(f"{option}: applies to loss_type {' or '.join(users)} only, not to {self.name}; "
                                  f"set it to {default} or use loss_type {users[0]}")


def _logratios(scored: Scored) -> torch.Tensor:
    return scored.policy - scored.reference.to(scored.policy.dtype)


def _per_token(scored: Scored) -> torch.Tensor:
    """Length-normalized log-probabilities: each answer's mean log-probability per token."""
    return scored.policy / scored.tokens.clamp(min=1)


def _with_sft_term(losses: torch.Tensor, scored: Scored, settings: DPOSettings) -> torch.Tensor:
    """``losses`` plus sft_weight times the chosen answer's mean negative log-likelihood per token."""
    if not settings.sft_weight:
        return losses
    return losses + settings.sft_weight * -scored.policy[:, 0] / scored.tokens[:, 0].clamp(min=1)


def sigmoid_loss(scored: Scored, settings: DPOSettings) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * (chosen - rejected log-ratio)); with label
    smoothing eps, Robust DPO's unbiased estimate under labels flipped with probability eps."""
    logratios = _logratios(scored)
    margin = settings.beta * (logratios[:, 0] - logratios[:, 1])
    smoothing = settings.label_smoothing
    losses = (-(1 - smoothing) * F.logsigmoid(margin) + smoothing * F.logsigmoid(-margin)) / (1 - 2 * smoothing)
    return _with_sft_term(losses, scored, settings)


def ipo_loss(scored: Scored, settings: DPOSettings) -> torch.Tensor:
    """IPO (Azar et al. 2023): (margin - 1 / (2 beta))^2 of per-token log-ratios: summed ones would
    make the squared loss grow with answer length (TRL normalizes so too)."""
    per_token = _logratios(scored) / scored.tokens.clamp(min=1)
    losses = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * settings.beta)) ** 2
    return _with_sft_term(losses, scored, settings)


def hinge_loss(scored: Scored, settings: DPOSettings) -> torch.Tensor:
    """SLiC (Zhao et al. 2023): max(0, 1 - beta * (chosen - rejected log-ratio))."""
    logratios = _logratios(scored)
    losses = torch.relu(1 - settings.beta * (logratios[:, 0] - logratios[:, 1]))
    return _with_sft_term(losses, scored, settings)


def simpo_loss(scored: Scored, settings: DPOSettings) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta * (chosen - rejected mean log-probability
    per token) - gamma). The length-normalized log-probability is the reward itself: no reference."""
    per_token = _per_token(scored)
    losses = -F.logsigmoid(settings.beta * (per_token[:, 0] - per_token[:, 1]) - settings.simpo_gamma)
    return _with_sft_term(losses, scored, settings)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation: log(-expm1(x)) near 0, log1p(-exp(x))
    below -ln 2 (Maechler 2012, as TRL's ORPO computes it)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(scored: Scored, settings: DPOSettings) -> torch.Tensor:
    """ORPO (Hong et al. 2024, eqs. 6-7): the chosen answer's mean negative log-likelihood per token
    minus lambda (``beta``, as TRL names it) times log sigmoid of the log odds ratio, where an
    answer's odds are P / (1 - P) of its per-token (length-normalized) probability P. No reference."""
    per_token = _per_token(scored)
    chosen, rejected = per_token[:, 0], per_token[:, 1]
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return -chosen - settings.beta * F.logsigmoid(log_odds)


def kl_reference_point(scored: Scored) -> torch.Tensor:
    """KTO's z_ref: the mean log-ratio of the batch's mismatched completions, at least 0, with no
    gradient (the paper's estimate; TRL's ``kl``)."""
    return _logratios(scored)[:, 1].mean().detach().clamp(min=0)


def kto_loss(scored: Scored, settings: DPOSettings) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 7): a desirable completion's loss is lambda_D (1 - sigmoid(beta
    (r - z_ref))), an undesirable one's lambda_U (1 - sigmoid(beta (z_ref - r))), r being its
    log-ratio to the reference and z_ref the KL reference point of the batch."""
    reward = _logratios(scored)[:, 0]
    kl = kl_reference_point(scored)
    desirable = settings.desirable_weight * (1 - torch.sigmoid(settings.beta * (reward - kl)))
    undesirable = settings.undesirable_weight * (1 - torch.sigmoid(settings.beta * (kl - reward)))
    return torch.where(scored.desirable, desirable, undesirable)


def reference_rewards(scored: Scored, settings: DPOSettings) -> torch.Tensor:
    """beta times each answer's log-probability ratio to the reference (DPO's implicit reward)."""
    return settings.beta * _logratios(scored).detach()


def per_token_rewards(scored: Scored, settings: DPOSettings) -> torch.Tensor:
    """beta times each answer's mean log-probability per token (SimPO's reward; TRL logs ORPO's so)."""
    return settings.beta * _per_token(scored).detach()


LOSSES: dict[str, PreferenceLoss] = {loss.name: loss for loss in (
    PreferenceLoss("sigmoid", "DPO, -log sigmoid(beta * margin of the answers' log-ratios to the reference), Robust "
                   "DPO with label_smoothing > 0",
                   sigmoid_loss, reference_rewards, needs_reference=True, paired=True,
                   options=("label_smoothing", "sft_weight")),
    PreferenceLoss("ipo", "IPO, the squared distance of the per-token log-ratio margin to 1 / (2 beta)",
                   ipo_loss, reference_rewards, needs_reference=True, paired=True, options=("sft_weight",)),
    PreferenceLoss("hinge", "SLiC, max(0, 1 - beta * log-ratio margin)",
                   hinge_loss, reference_rewards, needs_reference=True, paired=True, options=("sft_weight",)),
    PreferenceLoss("simpo", "SimPO, -log sigmoid(beta * margin of the answers' mean log-probabilities per token - "
                   "simpo_gamma), the paper's beta 2 to 2.5",
                   simpo_loss, per_token_rewards, needs_reference=False, paired=True,
                   options=("simpo_gamma", "sft_weight")),
    PreferenceLoss("orpo", "ORPO, the chosen answer's NLL per token - beta * log sigmoid(log odds ratio of the "
                   "answers' per-token probabilities), beta being the paper's lambda",
                   orpo_loss, per_token_rewards, needs_reference=False, paired=True),
    PreferenceLoss("kto", "KTO, unpaired examples (prompt, completion, label; a file of pairs is split into a "
                   "desirable and an undesirable example each) weighted by desirable_weight and undesirable_weight, "
                   "against a KL reference point from mismatched prompt-completion pairs",
                   kto_loss, reference_rewards, needs_reference=True, paired=False,
                   options=("desirable_weight", "undesirable_weight")),
)}
"""Every loss, by name, in the order --help lists them."""

LOSS_OPTIONS = ("label_smoothing", "sft_weight", "simpo_gamma", "desirable_weight", "undesirable_weight")
"""The settings only some losses read."""
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(DPOSettings)}


def preference_loss(name: str) -> PreferenceLoss:
    """The loss called ``name``; ConfigError naming the choices if there is none."""
    if name not in LOSSES:
        raise ConfigError(f"loss_type: expected one of {', '.join(LOSSES)}, got {name!r}")
    return LOSSES[name]


def loss_type_flag() -> dict[str, Any]:
    """The --loss-type flag's choices and help, from the registry."""
    listed = " ".join(f"{loss.name}: {loss.help}{'' if loss.needs_reference else ' (no reference model)'}."
                      for loss in LOSSES.values())
    return {"choices": list(LOSSES), "help": f"The preference loss. {listed}"}
