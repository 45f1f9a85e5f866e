"""Every preference loss on one fixed batch: against its paper's formula written out on plain
floats, and against TRL 1.16's own code for the same loss where TRL has it (its trainers' loss
methods, called with a minimal stand-in for the trainer)."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from sft.config.dpo import DPOSettings
from sft.errors import ConfigError
from sft.training.preference.losses import LOSSES, Scored, loss_type_flag, preference_loss
from sft.training.preference.metrics import UNPAIRED_METRICS, metric_means, metric_totals

# Four records: [chosen, rejected] (for KTO: [completion, mismatched completion]) summed
# log-probabilities under the policy and the reference, and the answers' token counts.
POLICY = [[-12.0, -15.5], [-30.2, -22.1], [-8.3, -8.9], [-40.0, -41.5]]
REFERENCE = [[-13.1, -14.0], [-29.0, -23.5], [-8.0, -9.6], [-39.2, -42.0]]
TOKENS = [[6, 9], [20, 11], [4, 5], [25, 30]]
DESIRABLE = [True, False, True, False]


def _scored() -> Scored:
    return Scored(torch.tensor(POLICY), torch.tensor(TOKENS, dtype=torch.float32), torch.tensor(REFERENCE),
                  torch.tensor(DESIRABLE))


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return math.exp(_log_sigmoid(x))


def _hand_losses(name: str, s: DPOSettings) -> list[float]:
    """Each record's loss from the papers' formulas, on Python floats."""
    losses = []
    kl = max(0.0, sum(p[1] - r[1] for p, r in zip(POLICY, REFERENCE, strict=True)) / len(POLICY))
    for (pc, pr), (rc, rr), (nc, nr), good in zip(POLICY, REFERENCE, TOKENS, DESIRABLE, strict=True):
        sft = s.sft_weight * -pc / nc
        if name == "sigmoid":  # DPO eq. 7; Robust DPO (Chowdhury et al. 2024) eq. 6 with eps
            z, eps = s.beta * ((pc - rc) - (pr - rr)), s.label_smoothing
            losses.append((-(1 - eps) * _log_sigmoid(z) + eps * _log_sigmoid(-z)) / (1 - 2 * eps) + sft)
        elif name == "ipo":  # IPO eq. 17, per-token log-ratios
            losses.append(((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * s.beta)) ** 2 + sft)
        elif name == "hinge":  # SLiC-HF's calibration loss
            losses.append(max(0.0, 1 - s.beta * ((pc - rc) - (pr - rr))) + sft)
        elif name == "simpo":  # SimPO eq. 6
            losses.append(-_log_sigmoid(s.beta / nc * pc - s.beta / nr * pr - s.simpo_gamma) + sft)
        elif name == "orpo":  # ORPO eqs. 4-7: odds(y|x) = P / (1 - P), P the per-token probability
            p_chosen, p_rejected = math.exp(pc / nc), math.exp(pr / nr)
            odds_ratio = (p_chosen / (1 - p_chosen)) / (p_rejected / (1 - p_rejected))
            losses.append(-pc / nc - s.beta * _log_sigmoid(math.log(odds_ratio)))
        elif name == "kto":  # KTO eq. 7: v(x, y) = lambda_D sigma(beta (r - z0)) or lambda_U sigma(beta (z0 - r))
            r = pc - rc
            value = (s.desirable_weight * _sigmoid(s.beta * (r - kl)) if good
                     else s.undesirable_weight * _sigmoid(s.beta * (kl - r)))
            losses.append((s.desirable_weight if good else s.undesirable_weight) - value)
    return losses


SETTINGS = [
    ("sigmoid", DPOSettings(beta=0.3)), ("sigmoid", DPOSettings(beta=0.2, label_smoothing=0.2)),
    ("sigmoid", DPOSettings(beta=0.3, sft_weight=0.5)), ("ipo", DPOSettings(beta=0.5)), ("hinge", DPOSettings(beta=0.1)),
    ("simpo", DPOSettings(beta=2.0, simpo_gamma=0.8)), ("simpo", DPOSettings(beta=2.5, simpo_gamma=1.2, sft_weight=0.1)),
    ("orpo", DPOSettings(beta=0.2)), ("kto", DPOSettings(beta=0.1)),
    ("kto", DPOSettings(beta=0.5, desirable_weight=1.33, undesirable_weight=0.7)),
]
IDS = ["dpo", "robust", "dpo+sft", "ipo", "hinge", "simpo", "simpo+sft", "orpo", "kto", "kto-weighted"]


@pytest.mark.parametrize(("name", "settings"), SETTINGS, ids=IDS)
def test_each_loss_equals_its_papers_formula(name: str, settings: DPOSettings) -> None:
    settings.loss_type = name
    ours = preference_loss(name).losses(_scored(), settings)
    assert ours.tolist() == pytest.approx(_hand_losses(name, settings), rel=1e-5, abs=1e-6)


# --- TRL 1.16 ---------------------------------------------------------------------------------


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(value: torch.Tensor) -> torch.Tensor:
        return value

    gather = gather_for_metrics


def _trainer(**attributes: object) -> SimpleNamespace:
    """What TRL's loss methods read of their trainer: its settings and a one-process accelerator."""
    return SimpleNamespace(accelerator=_Accelerator(), model=SimpleNamespace(training=True), aux_loss_enabled=False,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
                           precompute_ref_logps=True, **attributes)


def _fused_head_batch(logps: list[float], tokens: list[int]) -> tuple[dict[str, torch.Tensor], object]:
    """A batch of sequences of the given answer lengths, and a stand-in for TRL's fused-head model
    whose per-token log-probabilities sum to ``logps`` over each answer (all on its last token)."""
    width = max(tokens) + 1
    completion_mask = torch.tensor([[0] * (width - n) + [1] * n for n in tokens])
    per_token = torch.zeros(len(logps), width - 1)
    per_token[:, -1] = torch.tensor(logps)
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token).bool())
    batch = {"input_ids": torch.ones(len(logps), width, dtype=torch.long), "completion_mask": completion_mask,
             "attention_mask": torch.ones(len(logps), width, dtype=torch.long)}
    return batch, lambda **kwargs: outputs


@pytest.fixture(scope="module")
def trl() -> SimpleNamespace:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl import DPOTrainer, KTOTrainer  # trl/trainer/{dpo,kto}_trainer.py
    from trl.experimental.cpo import CPOTrainer  # trl/experimental/cpo/cpo_trainer.py
    from trl.experimental.orpo import ORPOTrainer  # trl/experimental/orpo/orpo_trainer.py

    return SimpleNamespace(dpo=DPOTrainer, kto=KTOTrainer, cpo=CPOTrainer, orpo=ORPOTrainer)


@pytest.mark.parametrize(("name", "settings", "trl_type"), [
    ("sigmoid", DPOSettings(beta=0.3), "sigmoid"), ("sigmoid", DPOSettings(beta=0.2, label_smoothing=0.2), "robust"),
    ("ipo", DPOSettings(beta=0.5), "ipo"), ("hinge", DPOSettings(beta=0.1), "hinge")],
    ids=["dpo", "robust", "ipo", "hinge"])
def test_dpo_losses_equal_trls_dpo_trainer(trl: SimpleNamespace, name: str, settings: DPOSettings,
                                           trl_type: str) -> None:
    """DPOTrainer._compute_loss (trl/trainer/dpo_trainer.py:1285) on the batch [chosen..., rejected...]."""
    policy, reference, tokens = torch.tensor(POLICY), torch.tensor(REFERENCE), torch.tensor(TOKENS)
    batch, model = _fused_head_batch(policy.T.flatten().tolist(), tokens.T.flatten().tolist())
    batch |= {"ref_chosen_logps": reference[:, 0], "ref_rejected_logps": reference[:, 1]}
    trainer = _trainer(ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[trl_type], loss_weights=[1.0],
                       beta=settings.beta, label_smoothing=settings.label_smoothing, use_weighting=False)
    theirs = trl.dpo._compute_loss(trainer, model, batch, return_outputs=False)
    ours = preference_loss(name).losses(_scored(), settings)
    assert float(ours.mean()) == pytest.approx(float(theirs), rel=1e-5)
    rewards = preference_loss(name).rewards(_scored(), settings)
    assert trainer._metrics["train"]["rewards/margins"][0] == pytest.approx(float((rewards[:, 0] - rewards[:, 1]).mean()),
                                                                            rel=1e-5)


def test_simpo_equals_trls_cpo_trainer(trl: SimpleNamespace) -> None:
    """CPOTrainer.cpo_loss (trl/experimental/cpo/cpo_trainer.py:678, loss_type simpo, cpo_alpha 0), on
    the per-token mean log-probabilities CPO gives it for simpo (average_log_prob, line 850)."""
    settings = DPOSettings(beta=2.0, simpo_gamma=0.8, loss_type="simpo")
    per_token = torch.tensor(POLICY) / torch.tensor(TOKENS)
    trainer = _trainer(alpha=0.0, loss_type="simpo", beta=settings.beta, simpo_gamma=settings.simpo_gamma,
                       label_smoothing=0.0)
    losses, chosen_rewards, rejected_rewards = trl.cpo.cpo_loss(trainer, per_token[:, 0], per_token[:, 1])
    assert preference_loss("simpo").losses(_scored(), settings).tolist() == pytest.approx(losses.tolist(), rel=1e-5)
    rewards = preference_loss("simpo").rewards(_scored(), settings)
    torch.testing.assert_close(rewards, torch.stack([chosen_rewards, rejected_rewards], 1))


def test_orpo_equals_trls_odds_ratio_loss_plus_the_chosen_nll(trl: SimpleNamespace) -> None:
    """ORPOTrainer.odds_ratio_loss (trl/experimental/orpo/orpo_trainer.py:670) gives lambda * log
    sigmoid(log odds ratio) per pair, which TRL subtracts from the chosen answer's NLL (line 848).
    TRL's NLL is a mean over the batch's chosen tokens prompt included (line 799); ours, as the
    paper's, each chosen answer's own mean: compared here as that, added to TRL's odds-ratio term."""
    settings = DPOSettings(beta=0.2, loss_type="orpo")
    per_token = torch.tensor(POLICY) / torch.tensor(TOKENS)
    losses, chosen_rewards, rejected_rewards, _, _ = trl.orpo.odds_ratio_loss(_trainer(beta=settings.beta),
                                                                                per_token[:, 0], per_token[:, 1])
    ours = preference_loss("orpo").losses(_scored(), settings)
    assert ours.tolist() == pytest.approx((-per_token[:, 0] - losses).tolist(), rel=1e-5)
    rewards = preference_loss("orpo").rewards(_scored(), settings)
    torch.testing.assert_close(rewards, torch.stack([chosen_rewards, rejected_rewards], 1))


@pytest.mark.parametrize("settings", [DPOSettings(beta=0.1), DPOSettings(beta=0.5, desirable_weight=1.33,
                                                                         undesirable_weight=0.7)],
                         ids=["kto", "kto-weighted"])
def test_kto_equals_trls_kto_trainer(trl: SimpleNamespace, settings: DPOSettings) -> None:
    """KTOTrainer._compute_loss (trl/trainer/kto_trainer.py:1370), its KL completions' log-probabilities
    given as ours are (lines 1379, 1443): the mean loss, the KL reference point and the rewards it logs."""
    settings.loss_type = "kto"
    policy, reference = torch.tensor(POLICY), torch.tensor(REFERENCE)
    batch, model = _fused_head_batch(policy[:, 0].tolist(), [n for n, _ in TOKENS])
    batch |= {"label": torch.tensor(DESIRABLE), "ref_logps": reference[:, 0], "ref_KL_logps": reference[:, 1]}
    trainer = _trainer(_compute_kl_logps=lambda model, batch: policy[:, 1], loss_type="kto", beta=settings.beta,
                       desirable_weight=settings.desirable_weight, undesirable_weight=settings.undesirable_weight,
                       calculate_KL=True)
    theirs = trl.kto._compute_loss(trainer, model, batch, return_outputs=False)
    loss = preference_loss("kto")
    ours = loss.losses(_scored(), settings)
    assert float(ours.mean()) == pytest.approx(float(theirs), rel=1e-5)
    logged = metric_means(metric_totals(_scored(), loss.rewards(_scored(), settings)).tolist(), UNPAIRED_METRICS)
    for name in UNPAIRED_METRICS:
        assert logged[name] == pytest.approx(trainer._metrics["train"][name][0], rel=1e-5), name


def test_the_kl_reference_point_is_never_below_zero_and_carries_no_gradient() -> None:
    scored = _scored()
    policy = scored.policy.clone().requires_grad_()
    below = Scored(policy - 5.0, scored.tokens, scored.reference, scored.desirable)  # every mismatched ratio < 0
    settings = DPOSettings(beta=0.1, loss_type="kto")
    losses = preference_loss("kto").losses(below, settings)
    r = [p[0] - 5.0 - ref[0] for p, ref in zip(POLICY, REFERENCE, strict=True)]
    expected = [1 - _sigmoid(0.1 * (x if good else -x)) for x, good in zip(r, DESIRABLE, strict=True)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)
    losses.sum().backward()
    assert policy.grad[:, 1].abs().max() == 0  # the mismatched completions only set the reference point


def test_the_registry_says_what_each_loss_needs() -> None:
    assert list(LOSSES) == ["sigmoid", "ipo", "hinge", "simpo", "orpo", "kto"]
    assert {name for name, loss in LOSSES.items() if not loss.needs_reference} == {"simpo", "orpo"}
    assert {name for name, loss in LOSSES.items() if not loss.paired} == {"kto"}
    flag = loss_type_flag()
    assert flag["choices"] == list(LOSSES)
    assert all(f"{name}: {loss.help}" in flag["help"] for name, loss in LOSSES.items())


@pytest.mark.parametrize(("name", "settings", "message"), [
    ("hinge", DPOSettings(label_smoothing=0.1), "label_smoothing: applies to loss_type sigmoid only, not to hinge"),
    ("sigmoid", DPOSettings(simpo_gamma=1.0), "simpo_gamma: applies to loss_type simpo only, not to sigmoid"),
    ("orpo", DPOSettings(sft_weight=0.1), "sft_weight: applies to loss_type sigmoid or ipo or hinge or simpo only"),
    ("kto", DPOSettings(sft_weight=0.1), "sft_weight: applies to loss_type sigmoid or ipo or hinge or simpo only"),
    ("simpo", DPOSettings(desirable_weight=2.0), "desirable_weight: applies to loss_type kto only, not to simpo"),
    ("nope", DPOSettings(), "loss_type: expected one of sigmoid, ipo, hinge, simpo, orpo, kto, got 'nope'"),
])
def test_an_option_the_loss_does_not_read_is_refused(name: str, settings: DPOSettings, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        preference_loss(name).check(settings)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_each_loss_accepts_its_own_options() -> None:
    for settings in (DPOSettings(loss_type="sigmoid", label_smoothing=0.1, sft_weight=1.0),
                     DPOSettings(loss_type="simpo", simpo_gamma=1.0, sft_weight=0.5),
                     DPOSettings(loss_type="kto", desirable_weight=2.0, undesirable_weight=0.5)):
        preference_loss(settings.loss_type).check(settings)


@pytest.mark.parametrize(("options", "message"), [
    ({"simpo_gamma": -0.1}, "simpo_gamma: must be >= 0"), ({"desirable_weight": 0.0}, "desirable_weight: must be > 0"),
    ({"undesirable_weight": -1.0}, "undesirable_weight: must be > 0")])
def test_option_ranges(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DPOSettings(**options)
