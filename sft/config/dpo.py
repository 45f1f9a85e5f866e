"""The ``dpo`` section of a preference-training run's configuration."""

from __future__ import annotations

from dataclasses import dataclass

from sft.errors import ConfigError

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOSettings:
    beta: float = 0.1
    """How far the trained model may move from the reference: the reward of an answer is beta
    times its log-probability ratio to the reference. Higher keeps it closer. For ``ipo`` this
    is the regularization tau of the IPO paper."""
    loss_type: str = "sigmoid"
    """``sigmoid`` (the DPO paper's -log sigmoid(beta * margin)), ``ipo`` (squared distance of the
    per-token log-ratio margin to 1 / (2 beta), length-normalized as TRL does), or ``hinge``
    (max(0, 1 - beta * margin), as in SLiC)."""
    label_smoothing: float = 0.0
    """Robust DPO: the assumed probability that a pair's preference label is flipped, in [0, 0.5).
    The sigmoid loss becomes its unbiased estimate under such noise, as TRL's ``robust`` loss
    (LLaMA-Factory's ``dpo_label_smoothing`` is the bounded cDPO form instead). Sigmoid only."""
    sft_weight: float = 0.0
    """Weight of an added SFT term: the chosen answer's mean negative log-likelihood per token,
    which keeps DPO from lowering the chosen answer's probability along with the rejected one's."""
    sft_adapter: str | None = None
    """Directory of an SFT run (or its checkpoint-N) to start from. Its adapter is merged into the
    base model in memory, that merged model is the reference, and a new adapter is trained on top;
    the run keeps a copy in its own sft_adapter/ so chat, merge and evaluation fold it in first.
    None: the base model is the reference."""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type: expected one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise ConfigError(f"label_smoothing: applies to loss_type sigmoid only (robust DPO), not to "
                              f"{self.loss_type}; set it to 0 or use loss_type sigmoid")
        if not self.sft_weight >= 0:
            raise ConfigError(f"sft_weight: must be >= 0, got {self.sft_weight}")
        if self.sft_adapter is not None and not self.sft_adapter.strip():
            raise ConfigError("sft_adapter: must name an SFT run directory, or be left out")
