"""What a model does to its logits after the language-model head, so our head computes the same.

The supervised-only head (sft.training.loss) runs the head's weight on answer positions itself
instead of asking the model for logits. Families differ right there: Gemma 2/3 soft-cap the final
logits (cap * tanh(logits / cap)), Granite divides them by ``logits_scaling``, Cohere multiplies
them by ``logit_scale``, Falcon-H1 by ``lm_head_multiplier``. A head written for Llama trains
those models on another objective without an error, so the rule is read from the config and then
checked once against the model's own forward: where the model's logits are not what the rule
computes (a family whose transform is not known here), the loss falls back to the model's own
logits for the run, and says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

RULE_ATTRIBUTE = "_sft_logit_rule"
"""Attribute of the head module: its LogitRule once checked, or UNKNOWN."""


@dataclass(frozen=True)
class LogitRule:
    """logits = softcap * tanh(scale * (hidden @ W.T) / softcap), or scale * (hidden @ W.T) without a cap."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The rule on raw head outputs (out of place; the reference the fused loss is tested against)."""
        logits = logits * self.scale if self.scale != 1.0 else logits
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def describe(self) -> str:
        parts = [f"x {self.scale:g}"] if self.scale != 1.0 else []
        if self.softcap is not None:
            parts.append(f"soft cap {self.softcap:g}")
        return ", ".join(parts) or "none"


UNKNOWN = "unknown"
"""The model's logits are not what any rule read from its config computes."""


def rule_from_config(config) -> LogitRule:
    """The final-logit transform a config declares (transformers' names for it, by family)."""
    scale = 1.0
    if getattr(config, "logits_scaling", None):  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "lm_head_multiplier", None) is not None:  # Falcon-H1
        scale *= float(config.lm_head_multiplier)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    return LogitRule(scale=scale, softcap=float(softcap) if softcap else None)


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside wrappers (DDP's .module; PEFT forwards attributes itself)."""
    return getattr(model, "module", model)


def logit_rule(model: torch.nn.Module, head: torch.nn.Module | None = None) -> LogitRule | None:
    """The rule our head must apply for ``model``, or None: use the model's own logits.

    Read from the config and checked once against one forward pass of the model itself (a few
    tokens), the result kept on the head module. A mismatch is logged once."""
    model = _inner(model)
    head = head if head is not None else model.get_output_embeddings()
    rule = getattr(head, RULE_ATTRIBUTE, None)
    if rule is None:
        rule = check_rule(model, head, rule_from_config(model.config))
        setattr(head, RULE_ATTRIBUTE, rule)
    return None if rule == UNKNOWN else rule


@torch.no_grad()
def check_rule(model: torch.nn.Module, head: torch.nn.Module, rule: LogitRule) -> LogitRule | str:
    """``rule`` if the model's own logits on a short probe equal the rule applied to its head on the
    same forward pass's last hidden states, else UNKNOWN (with a warning naming the model type)."""
    weight = head.weight
    if weight.device.type == "meta" or weight.numel() == 0:
        return rule  # sharded or not materialized: nothing to compare here
    vocab = weight.shape[0]
    probe = (torch.arange(8, device=weight.device) * 7919 % vocab).unsqueeze(0)
    with torch.autocast(weight.device.type, enabled=False):  # the transform's math, not autocast's rounding
        outputs = model(input_ids=probe, output_hidden_states=True, use_cache=False)
    hidden = outputs.hidden_states[-1].to(weight.dtype)
    ours = rule.apply((hidden @ weight.T).float())
    theirs = outputs.logits.float()
    tolerance = 1e-3 if weight.dtype == torch.float32 else 5e-2
    if ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=tolerance,
                                                     atol=tolerance * max(1.0, theirs.abs().max().item())):
        return rule
    logger.warning(
        "The logits of %s are not its head's output under the transform read from its config (%s): the loss "
        "uses the model's own logits for this run (correct, with more memory than the supervised-only head).",
        getattr(model.config, "model_type", type(model).__name__), rule.describe())
    return UNKNOWN

