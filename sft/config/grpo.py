"""The ``grpo`` section of an online reinforcement-learning run's configuration (``sft grpo``)."""

from __future__ import annotations

from dataclasses import dataclass

from sft.errors import ConfigError


@dataclass
class GRPOSettings:
    group_size: int = 4
    """Answers sampled per prompt at each step (GRPO's G). Their rewards are compared with each
    other: a prompt whose answers all score alike teaches nothing that step."""
    max_answer_tokens: int = 128
    """Longest sampled answer; an answer cut here is trained as it is (it earned its reward)."""
    temperature: float = 1.0
    """Sampling temperature; 0 samples greedily (every answer of a group alike: no signal)."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of tokens holding this much probability."""
    generation_batch_size: int = 16
    """Answers sampled at once (rows of one decoding batch with a KV cache)."""
    beta: float = 0.0
    """Weight of the KL penalty to the reference (the base model, or the SFT model with
    --sft-adapter), per token; 0 computes no reference log-probabilities at all."""
    epsilon: float = 0.2
    """Clip range of the probability ratio to the sampling policy: below 1 - epsilon."""
    epsilon_high: float | None = None
    """Upper clip of the ratio, 1 + epsilon_high (DAPO's clip-higher); None: epsilon."""
    num_iterations: int = 1
    """Optimizer steps taken on each batch of samples (GRPO's mu). With 1 the ratio is 1 and the
    clip never acts; with more, the later steps are off-policy and the clip bounds them."""
    scale_rewards: bool = True
    """Divide each group's centred rewards by their standard deviation (GRPO); false keeps only
    the centring (Dr. GRPO), which does not favour prompts whose rewards barely differ."""
    verifier: bool = True
    """Score answers with the built-in instruction verifier: the share of a record's
    ``instruction_id_list`` (IFEval's checkers, strict) the answer follows. Every record must then
    carry ``instruction_id_list`` and ``kwargs``. Rewards of --reward functions are added to it."""
    share_prompts: bool | None = None
    """Train each prompt once per group: its G answers packed after one copy of it, each attending
    to it and not to its siblings (the same log-probabilities as G copies, for fewer tokens).
    Needs packing and attn_implementation varlen_sdpa; None (auto) shares on the CPU, where it is
    measured (docs/performance.md), and not on other devices, where it takes the masked path."""
    sft_adapter: str | None = None
    """Directory of an SFT run (or its checkpoint-N) to start from: its adapter is merged into the
    base in memory, that model is the reference, and a new adapter is trained on top (as DPO does)."""

    def __post_init__(self) -> None:
        for name in ("group_size", "max_answer_tokens", "generation_batch_size", "num_iterations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if not self.beta >= 0:
            raise ConfigError(f"beta: must be >= 0, got {self.beta}")
        if not 0 < self.epsilon < 1:
            raise ConfigError(f"epsilon: must be in (0, 1), got {self.epsilon}")
        if self.epsilon_high is not None and not self.epsilon_high > 0:
            raise ConfigError(f"epsilon_high: must be > 0, got {self.epsilon_high}")
        if self.sft_adapter is not None and not self.sft_adapter.strip():
            raise ConfigError("sft_adapter: must name an SFT run directory, or be left out")

    @property
    def clip_range(self) -> tuple[float, float]:
        """The ratio's allowed interval, (1 - epsilon, 1 + epsilon_high)."""
        return 1 - self.epsilon, 1 + (self.epsilon if self.epsilon_high is None else self.epsilon_high)
