"""The preference metrics of one model, on numbers small enough to check by eye."""

from __future__ import annotations

import pytest
import torch

from sft.inference.preference_eval import preference_metrics


def test_accuracies_and_rewards_on_three_pairs() -> None:
    logps = torch.tensor([[-10.0, -12.0], [-30.0, -20.0], [-8.0, -8.5]])  # chosen wins, loses, wins
    answer_tokens = torch.tensor([[5.0, 6.0], [30.0, 10.0], [2.0, 4.0]])  # per token: -2 vs -2, -1 vs -2, -4 vs -2.1
    reference = torch.tensor([[-11.0, -11.0], [-30.0, -21.0], [-8.0, -8.0]])
    metrics = preference_metrics(logps, reference, answer_tokens, beta=0.5)
    assert metrics["preference_accuracy"] == pytest.approx(2 / 3)
    assert metrics["length_normalized_accuracy"] == pytest.approx(1 / 3)  # only pair 2 wins per token
    margins = [0.5 * ((1.0) - (-1.0)), 0.5 * (0.0 - 1.0), 0.5 * (0.0 - (-0.5))]
    assert metrics["rewards/margins"] == pytest.approx(sum(margins) / 3)
    assert metrics["rewards/accuracies"] == pytest.approx(2 / 3)
    assert metrics["rewards/chosen"] == pytest.approx(0.5 * (1.0 + 0.0 + 0.0) / 3)
    assert metrics["logps/rejected"] == pytest.approx((-12.0 - 20.0 - 8.5) / 3)
