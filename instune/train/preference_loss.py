"""Preference losses on (chosen, rejected) pairs, as their papers write them, and the rewards they imply.

Every loss takes, per pair, the summed log-probabilities of the response tokens of each side under the
policy (and, for the reference-based losses, under the frozen reference) and the number of those tokens:

    dpo    Rafailov et al. 2023, "Direct Preference Optimization": -log σ(β h), where
           h = (log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x)).
    cdpo   Mitchell 2023, "A note on DPO with noisy preferences" (conservative DPO): the labels are taken
           to be flipped with probability ε (label_smoothing): -(1-ε) log σ(β h) - ε log σ(-β h).
    ipo    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences":
           (h - 1/(2β))², a squared loss that does not push h to infinity. Sequence log-probabilities (sums),
           as the paper writes it; TRL divides them by the length first.
    simpo  Meng et al. 2024, "SimPO": no reference; the reward is the length-normalised log-probability,
           -log σ(β/|y_w| log π(y_w|x) - β/|y_l| log π(y_l|x) - γ) with a target margin γ. Its own β
           (simpo_beta, 2.0: the paper's range is 2-10, not DPO's 0.1) and γ = simpo_gamma_beta_ratio · β.
    orpo   Hong et al. 2024, "ORPO": no reference; the SFT loss of the chosen side (mean token NLL) plus
           λ · -log σ(log odds(y_w|x) - log odds(y_l|x)), odds(y|x) = P/(1-P) with P the geometric mean
           token probability, exp(log π(y|x)/|y|) (orpo_lambda).

The rewards reported for a pair are β times the policy-over-reference log-ratio of each side (dpo, cdpo,
ipo), β times the mean token log-probability (simpo), or the log odds (orpo); reward accuracy is the
fraction of pairs whose chosen reward is higher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from instune.config import REFERENCE_OBJECTIVES, uses_reference  # noqa: F401  (the loop takes them from here)
from instune.data.reference_logprobs import response_logps  # noqa: F401  (the loop takes it from here)

OBJECTIVES = ("sft", "dpo", "ipo", "cdpo", "simpo", "orpo")
PREFERENCE_OBJECTIVES = OBJECTIVES[1:]


@dataclass
class PreferenceSettings:
    """The pair loss's settings (config: the `dpo` section; the objective is train.objective)."""

    beta: float = 0.1
    label_smoothing: float = 0.1
    simpo_beta: float = 2.0
    simpo_gamma_beta_ratio: float = 0.5
    orpo_lambda: float = 0.1
    # precompute | adapter_disabled | model (reference_logprobs.py, preference_step.py).
    reference: str = "precompute"
    # dpo.reference: model loads this (unset: the run's base model).
    reference_model_path: str | None = None


@dataclass
class PairLosses:
    """Per pair: the loss and the two rewards (1-D tensors of the same length)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) for P = exp(mean_logps) < 1, computed without forming 1 - P directly."""
    # log1p(-exp(x)) loses precision as x -> 0; clamping keeps P strictly below 1 (a sure answer's odds
    # are large, not infinite).
    mean_logps = mean_logps.clamp(max=-1e-6)
    return mean_logps - torch.log1p(-torch.exp(mean_logps))


def pair_losses(objective: str, settings: PreferenceSettings, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                ref_chosen_logps: torch.Tensor | None = None,
                ref_rejected_logps: torch.Tensor | None = None) -> PairLosses:
    """The loss of each pair under `objective`; logps are summed over each response's tokens."""
    beta = settings.beta
    if objective in REFERENCE_OBJECTIVES:
        assert ref_chosen_logps is not None and ref_rejected_logps is not None, \
            f"{objective} needs the reference log-probs of both sides"
        chosen_ratio = chosen_logps - ref_chosen_logps
        rejected_ratio = rejected_logps - ref_rejected_logps
        h = chosen_ratio - rejected_ratio
        if objective == "dpo":
            losses = -F.logsigmoid(beta * h)
        elif objective == "cdpo":
            eps = settings.label_smoothing
            losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        else:  # ipo
            losses = (h - 1 / (2 * beta)) ** 2
        return PairLosses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
    chosen_mean = chosen_logps / chosen_tokens.clamp(min=1)
    rejected_mean = rejected_logps / rejected_tokens.clamp(min=1)
    if objective == "simpo":
        beta = settings.simpo_beta
        gamma = settings.simpo_gamma_beta_ratio * beta
        losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)
        return PairLosses(losses, beta * chosen_mean.detach(), beta * rejected_mean.detach())
    if objective == "orpo":
        chosen_odds, rejected_odds = log_odds(chosen_mean), log_odds(rejected_mean)
        odds_ratio_loss = -F.logsigmoid(chosen_odds - rejected_odds)
        losses = -chosen_mean + settings.orpo_lambda * odds_ratio_loss
        return PairLosses(losses, chosen_odds.detach(), rejected_odds.detach())
    raise ValueError(f"not a preference objective: {objective!r}")  # config validation keeps this from happening


def step_metrics(pairs: PairLosses, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> dict[str, float]:
    """Sums over this batch's pairs (the caller adds them over workers and divides by the pair count)."""
    margins = pairs.chosen_rewards - pairs.rejected_rewards
    return {
        "rewards/chosen": float(pairs.chosen_rewards.sum()),
        "rewards/rejected": float(pairs.rejected_rewards.sum()),
        "rewards/accuracy": float((margins > 0).float().sum()),
        "rewards/margin": float(margins.sum()),
        "logps/chosen": float(chosen_logps.detach().sum()),
        "logps/rejected": float(rejected_logps.detach().sum()),
    }
