"""The ``dpo`` section of a preference-training run's configuration."""

from __future__ import annotations

from dataclasses import dataclass

from sft.errors import ConfigError


@dataclass
class DPOSettings:
    beta: float = 0.1
    """How far the trained model may move from the reference: the reward of an answer is beta
    times its log-probability ratio to the reference. Higher keeps it closer. For ``ipo`` this
    is the regularization tau of the IPO paper, for ``simpo`` the reward scale of the SimPO paper
    (which uses 2 to 2.5), for ``orpo`` the weight lambda of the odds-ratio term."""
    loss_type: str = "sigmoid"
    """The preference loss, by name (sft.training.preference.losses; ``sft dpo --help`` lists each):
    sigmoid (DPO), ipo, hinge, simpo, orpo (no reference model) or kto (unpaired examples)."""
    label_smoothing: float = 0.0
    """Robust DPO: the assumed probability that a pair's preference label is flipped, in [0, 0.5).
    The sigmoid loss becomes its unbiased estimate under such noise, as TRL's ``robust`` loss
    (LLaMA-Factory's ``dpo_label_smoothing`` is the bounded cDPO form instead). Sigmoid only."""
    sft_weight: float = 0.0
    """Weight of an added SFT term: the chosen answer's mean negative log-likelihood per token,
    which keeps DPO from lowering the chosen answer's probability along with the rejected one's."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma: the chosen answer's reward must exceed the rejected
    one's by it (TRL's default 0.5; the paper tunes gamma / beta around 0.5). Simpo only."""
    desirable_weight: float = 1.0
    """KTO's lambda_D: the weight of a desirable example's loss. The paper keeps lambda_D n_D /
    (lambda_U n_U) in [1, 4/3] for n_D desirable and n_U undesirable examples. Kto only."""
    undesirable_weight: float = 1.0
    """KTO's lambda_U: the weight of an undesirable example's loss. Kto only."""
    sft_adapter: str | None = None
    """Directory of an SFT run (or its checkpoint-N) to start from. Its adapter is merged into the
    base model in memory, that merged model is the reference, and a new adapter is trained on top;
    the run keeps a copy in its own sft_adapter/ so chat, merge and evaluation fold it in first.
    None: the base model is the reference."""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if not self.sft_weight >= 0:
            raise ConfigError(f"sft_weight: must be >= 0, got {self.sft_weight}")
        if not self.simpo_gamma >= 0:
            raise ConfigError(f"simpo_gamma: must be >= 0, got {self.simpo_gamma}")
        for name in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.sft_adapter is not None and not self.sft_adapter.strip():
            raise ConfigError("sft_adapter: must name an SFT run directory, or be left out")
