"""Each preference loss against a value worked out by hand from its paper's formula, on one or two pairs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from instune.train.preference_loss import (PreferenceSettings, log_odds, pair_losses, response_logps,
                                           step_metrics)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# One pair: policy log-probs -10 (chosen) and -12 (rejected), reference -11 and -11, so the log-ratios are
# +1 and -1 and h = 2. With β = 0.1: β h = 0.2.
POLICY = dict(chosen_logps=t(-10.0), rejected_logps=t(-12.0), chosen_tokens=t(5), rejected_tokens=t(6),
              ref_chosen_logps=t(-11.0), ref_rejected_logps=t(-11.0))


def test_dpo_is_minus_log_sigmoid_of_beta_times_the_log_ratio_difference():
    pairs = pair_losses("dpo", PreferenceSettings(beta=0.1), **POLICY)
    # -log σ(0.2) = log(1 + e^-0.2)
    assert pairs.losses.item() == pytest.approx(0.5981388693815918)
    assert (pairs.chosen_rewards.item(), pairs.rejected_rewards.item()) == pytest.approx((0.1, -0.1))


def test_conservative_dpo_mixes_in_the_flipped_label():
    pairs = pair_losses("cdpo", PreferenceSettings(beta=0.1, label_smoothing=0.1), **POLICY)
    # 0.9 · -log σ(0.2) + 0.1 · -log σ(-0.2) = 0.9 · 0.59814 + 0.1 · 0.79814
    assert pairs.losses.item() == pytest.approx(0.6181388693815918)
    # With ε = 0 it is DPO.
    plain = pair_losses("cdpo", PreferenceSettings(beta=0.1, label_smoothing=0.0), **POLICY)
    assert plain.losses.item() == pytest.approx(0.5981388693815918)


def test_ipo_is_the_squared_distance_of_h_from_one_over_two_beta():
    pairs = pair_losses("ipo", PreferenceSettings(beta=0.1), **POLICY)
    assert pairs.losses.item() == pytest.approx((2 - 5) ** 2)
    # At h = 1/(2β) the loss is 0, and it rises again past it (DPO's would keep falling).
    at_target = pair_losses("ipo", PreferenceSettings(beta=0.5), **POLICY)
    assert at_target.losses.item() == pytest.approx((2 - 1) ** 2)


def test_simpo_uses_length_normalised_log_probs_a_margin_and_no_reference():
    # Chosen: -6 over 3 tokens = -2 per token; rejected: -12 over 4 = -3. β = 2, γ/β = 0.25 (γ = 0.5):
    # 2 · 1 - 0.5 = 1.5.
    settings = PreferenceSettings(simpo_beta=2.0, simpo_gamma_beta_ratio=0.25)
    pairs = pair_losses("simpo", settings, t(-6.0), t(-12.0), t(3), t(4))
    assert pairs.losses.item() == pytest.approx(0.2014132779827524)  # -log σ(1.5)
    assert (pairs.chosen_rewards.item(), pairs.rejected_rewards.item()) == pytest.approx((-4.0, -6.0))
    # DPO's β does not reach SimPO.
    assert pair_losses("simpo", PreferenceSettings(beta=0.1, simpo_beta=2.0, simpo_gamma_beta_ratio=0.25),
                       t(-6.0), t(-12.0), t(3), t(4)).losses.item() == pytest.approx(0.2014132779827524)


def test_simpo_defaults_are_the_papers_beta_2_and_gamma_half_of_beta():
    # β = 2.0, γ = 0.5 · 2.0 = 1.0; same pair: 2 · 1 - 1 = 1; -log σ(1) = log(1 + e^-1).
    pairs = pair_losses("simpo", PreferenceSettings(), t(-6.0), t(-12.0), t(3), t(4))
    assert pairs.losses.item() == pytest.approx(0.31326168751822286)
    # β = 10 (the top of the paper's range), γ/β = 0.3: 10 · 1 - 3 = 7; -log σ(7).
    settings = PreferenceSettings(simpo_beta=10.0, simpo_gamma_beta_ratio=0.3)
    assert pair_losses("simpo", settings, t(-6.0), t(-12.0), t(3), t(4)).losses.item() == \
        pytest.approx(0.0009114664537742447)


def test_orpo_adds_the_odds_ratio_term_to_the_chosen_nll():
    # Chosen: -1.0 over 2 tokens (mean -0.5); rejected: -3.0 over 3 (mean -1.0).
    # log odds(m) = m - log(1 - e^m): 0.432752 and -0.541325; loss = 0.5 + 0.1 · -log σ(0.974077).
    pairs = pair_losses("orpo", PreferenceSettings(orpo_lambda=0.1), t(-1.0), t(-3.0), t(2), t(3))
    assert pairs.losses.item() == pytest.approx(0.5320299785237537)
    assert log_odds(t(-0.5)).item() == pytest.approx(0.43275212956718856)
    assert pairs.chosen_rewards.item() == pytest.approx(0.43275212956718856)


def test_losses_are_per_pair_and_gradients_flow_to_the_policy_only():
    chosen = t(-10.0, -3.0).requires_grad_()
    pairs = pair_losses("dpo", PreferenceSettings(beta=1.0), chosen, t(-12.0, -1.0), t(5, 5), t(5, 5),
                        t(-11.0, -2.0), t(-11.0, -2.0))
    assert pairs.losses.shape == (2,)
    # Pair 2 prefers the rejected side: h = -1 - 1 = -2.
    assert pairs.losses[1].item() == pytest.approx(-F.logsigmoid(torch.tensor(-2.0)).item())
    pairs.losses.sum().backward()
    # d/dx -log σ(x - c) = -(1 - σ(x - c)) = -σ(-h)
    assert chosen.grad.tolist() == pytest.approx([-torch.sigmoid(torch.tensor(-2.0)).item(),
                                                  -torch.sigmoid(torch.tensor(2.0)).item()])
    metrics = step_metrics(pairs, chosen, t(-12.0, -1.0))
    assert metrics["rewards/accuracy"] == 1.0  # pair 1 right, pair 2 wrong
    assert metrics["rewards/margin"] == pytest.approx(2.0 + -2.0)
    assert metrics["logps/chosen"] == pytest.approx(-13.0)


def test_response_logps_sum_the_labelled_tokens_predicted_from_the_previous_position():
    # Vocabulary of 3; row 0 labels tokens 2 and 3, row 1 only token 3.
    logits = torch.log(torch.tensor([[[0.2, 0.3, 0.5], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8], [1 / 3] * 3]] * 2))
    labels = torch.tensor([[-100, -100, 0, 2], [-100, -100, -100, 1]])
    logps, counts = response_logps(logits, labels)
    # Row 0: token 0 from position 1 (p 0.6), token 2 from position 2 (p 0.8). Row 1: token 1 from position 2.
    assert logps.tolist() == pytest.approx([torch.log(torch.tensor(0.6 * 0.8)).item(),
                                            torch.log(torch.tensor(0.1)).item()], rel=1e-5)
    assert counts.tolist() == [2, 1]
