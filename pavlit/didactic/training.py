"""Training on the planted task (docs/method.md §7): :class:`DidacticRLModule` (SFT, then REINFORCE with the effective
reward), the exact and Monte-Carlo prover values it rewards with, and the SFT and evaluation loops it runs.

``pavlit fit --config configs/didactic/rl.yaml`` first fine-tunes the :class:`~pavlit.didactic.policy.MLPPolicy`
on samples of the γ = ``sft_gamma`` prover (a mediocre start), then runs ``iterations`` REINFORCE updates. Each
update samples ``batch_size`` rollouts from π and weights ``∇log π(a_h | s_h)`` of every action with

    w_h = R + α · A^μ(s_h, a_h) − b

where ``R`` is the rollout's outcome (the Monte-Carlo return, an unbiased ``Q^π(s_h, a_h)``), ``A^μ`` the
advantage of the γ-prover and ``b`` an optional baseline. ``A^μ`` is exact by default: the prover depends on a
prefix only through its match state, so its values are a table over (position, match state)
(:attr:`PlantedProver.values`) and the advantage is the difference of two table entries
(:func:`pavlit.values.advantages`); ``advantage_source="mc"`` estimates each prefix value from ``mc_rollouts``
prover rollouts instead (the paper's "near-exact Q/A from ≥ 100 rollouts"). α = 0 is outcome-only RL.

The training data is a stream of iteration indices: rollouts are generated inside ``training_step``, so
Lightning's loop, logging and checkpointing apply unchanged. Every ``eval_every`` iterations (and at the end)
``eval_rollouts`` fresh samples give ``eval/accuracy``, unbiased ``eval/pass@k`` and the greedy rollout's
outcome ``eval/greedy``; the rows are also kept in :attr:`DidacticRLModule.history` for the sweep.

The effective reward and the REINFORCE loss are those of the language-model RL (:mod:`pavlit.policy_gradient`),
with one token per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch.utils.data import DataLoader, Dataset

from pavlit import values
from pavlit.didactic.policy import MLPPolicy, action_mask
from pavlit.policy_gradient import effective_step_rewards, masked_mean, policy_gradient_loss
from pavlit.provers.planted import PlantedProver
from pavlit.tasks.planted import PlantedTask

__all__ = [
    "DidacticRLModule",
    "evaluate_policy",
    "mc_prover_prefix_values",
    "prover_prefix_values",
    "reinforce_loss",
    "step_weights",
    "supervised_finetune",
]


def prover_prefix_values(prover: PlantedProver, tokens: torch.Tensor) -> torch.Tensor:
    """Exact ``Q^μ`` of every prefix of every rollout.

    Args:
        prover: The γ-prover.
        tokens: ``LongTensor[B, L]`` rollouts (after the first EOS the values are those of an ended prefix).

    Returns:
        ``[B, L + 1]`` float64; column ``i`` is the value after ``i`` tokens (column 0: the empty prefix). A prefix
        that found the target is worth 1; one that wrote EOS first is worth 0.
    """
    task = prover.task
    states = task.match_states(tokens)  # EOS is an ordinary (non-target) token here: it resets the state to 0
    table = prover.values.to(tokens.device)
    positions = torch.arange(tokens.shape[1] + 1, device=tokens.device).expand_as(states)
    prefix_values = table[positions, states]
    eos_written = torch.nn.functional.pad(torch.cumsum(tokens == task.eos, dim=1) > 0, (1, 0))
    found = states == len(task.target)  # absorbing, so a target found before an EOS stays found
    return torch.where(eos_written & ~found, torch.zeros_like(prefix_values), prefix_values)


def mc_prover_prefix_values(
    prover: PlantedProver, tokens: torch.Tensor, n_rollouts: int = 100, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Monte-Carlo ``Q̂^μ`` of every prefix of every rollout: the fraction of ``n_rollouts`` prover completions
    that find the target (independent completions per prefix; ended or found prefixes are exactly 0 or 1).

    Returns:
        ``[B, L + 1]`` float64, shaped as :func:`prover_prefix_values`.
    """
    if n_rollouts < 1:
        raise ValueError("n_rollouts must be at least 1")
    task = prover.task
    m, length = len(task.target), task.length
    exact = prover_prefix_values(prover, tokens)
    states = task.match_states(tokens)
    positions = torch.arange(tokens.shape[1] + 1, device=tokens.device).expand_as(states)
    open_ = (exact > 0) & (exact < 1)  # neither decided nor ended; the rest is deterministic
    start_pos = positions[open_].repeat_interleave(n_rollouts)
    k = states[open_].repeat_interleave(n_rollouts)
    probs = prover.probs_by_state.to(torch.float32).to(tokens.device)
    transitions = torch.cat([task.transitions, torch.full((1, task.vocab_size), m)]).to(tokens.device)
    alive = torch.ones_like(k, dtype=torch.bool)
    for step in range(length):
        active = alive & (start_pos + step < length) & (k < m)
        if not bool(active.any()):
            break
        drawn = torch.multinomial(probs[k.clamp(max=m - 1)], 1, generator=generator).squeeze(1)
        alive &= ~(active & (drawn == task.eos))
        k = torch.where(active & (drawn != task.eos), transitions[k, drawn], k)
    success = (k == m).to(torch.float64).reshape(-1, n_rollouts).mean(dim=1)
    estimate = exact.clone()
    estimate[open_] = success
    return estimate


def step_weights(
    outcome: torch.Tensor,
    a_mu: torch.Tensor,
    mask: torch.Tensor,
    alpha: float = 1.0,
    baseline: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Per-step REINFORCE weights ``R + α · A^μ(s_h, a_h) − b``, zero at masked steps.

    Args:
        outcome: ``[B]`` rollout outcomes in [0, 1] (the Monte-Carlo ``Q^π`` of every step of the rollout).
        a_mu: ``[B, H]`` prover advantages of the steps.
        mask: ``[B, H]`` True for real steps.
        alpha: Weight of the prover advantage (0: outcome-only RL).
        baseline: Subtracted from every step (a float, ``[B]`` or ``[B, H]``).

    Returns:
        ``[B, H]`` weights.
    """
    baseline = torch.as_tensor(baseline, dtype=a_mu.dtype, device=a_mu.device)
    if baseline.dim() == 1:
        baseline = baseline[:, None]
    weights = effective_step_rewards(outcome, a_mu, mask, alpha) - baseline
    return torch.where(mask, weights, torch.zeros_like(weights))


def reinforce_loss(log_probs: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE surrogate ``−(1/B) Σ_b Σ_h w_bh · log π(a_bh | s_bh)`` over real steps (weights are constants):
    :func:`pavlit.policy_gradient.policy_gradient_loss` per response, with masked steps' terms exactly 0."""
    weights = torch.where(mask, weights, torch.zeros_like(weights))
    log_probs = torch.where(mask, log_probs, torch.zeros_like(log_probs))
    return policy_gradient_loss(log_probs, weights, mask, normalization="responses")


def supervised_finetune(
    policy: MLPPolicy,
    prover: PlantedProver,
    n_samples: int = 3200,
    iterations: int = 50,
    batch_size: int = 64,
    lr: float = 1e-3,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Fit the policy to ``n_samples`` prover rollouts by maximum likelihood (Adam, cycling through the samples).

    Returns:
        The loss (mean negative log-likelihood per action) of every iteration.
    """
    device = next(policy.parameters()).device
    data = prover.sample(n_samples, generator=generator).to(device)
    mask = action_mask(data, policy.eos)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    losses = []
    for it in range(iterations):
        rows = torch.arange(it * batch_size, (it + 1) * batch_size, device=device) % n_samples
        log_probs = policy.log_probs(data[rows])
        loss = -masked_mean(log_probs, mask[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def evaluate_policy(
    policy: MLPPolicy, n_rollouts: int = 512, generator: torch.Generator | None = None, pass_at: Sequence[int] = (8, 64)
) -> dict[str, float]:
    """Sampled accuracy, unbiased pass@k (from the same samples), the greedy rollout's outcome and how diverse
    the samples are: ``mode_share`` (fraction of samples equal to the most frequent sequence, EOS-padded) and
    ``distinct_correct`` (number of distinct correct sequences among them)."""
    task = policy.task
    tokens = policy.sample(n_rollouts, generator)
    correct = task.reward(tokens)
    metrics = {"accuracy": float(correct.mean()), "greedy": float(task.reward(policy.sample(1, greedy=True))[0])}
    _, counts = torch.unique(tokens, dim=0, return_counts=True)
    metrics["mode_share"] = float(counts.max()) / n_rollouts
    metrics["distinct_correct"] = float(len(torch.unique(tokens[correct > 0], dim=0)))
    n_correct = int(correct.sum())
    for k in pass_at:
        if k <= n_rollouts:
            metrics[f"pass@{k}"] = float(values.best_of_k_from_counts(n_correct, n_rollouts, k))
    return metrics


class _Iterations(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


class DidacticRLModule(LightningModule):
    """SFT on the γ = ``sft_gamma`` prover, then REINFORCE on ``R + α·A^μ`` of the γ = ``gamma`` prover.

    Args:
        gamma: Strength γ of the prover whose advantages shape the reward.
        alpha: Weight α of the prover advantage; 0 is outcome-only RL.
        advantage_source: ``"exact"`` (dynamic programme) or ``"mc"`` (``mc_rollouts`` prover rollouts per prefix).
        mc_rollouts: Rollouts per prefix for ``advantage_source="mc"``.
        baseline: ``"none"`` or ``"batch_mean"`` (subtract the batch's mean outcome from every weight).
        batch_size: Rollouts per RL iteration.
        iterations: RL iterations (one optimiser step each; the length of the training "dataset").
        optimizer: Builds the RL optimiser from the parameters (YAML: ``class_path: torch.optim.SGD`` +
            ``init_args: {lr: ...}``); default Adam with its default learning rate 1e-3 (docs/method.md §7).
        hidden_size: Width of the MLP's hidden layers.
        n_layers: Number of hidden layers.
        head: The policy's output layer: ``"masked"`` (default; a masked autoregressive MLP, each position's
            logits from parameters of their own), ``"per_position"`` (a shared trunk with one output block per
            position) or ``"shared"`` (one output layer for every position: the ablation that fails at γ ≥ 10,
            see :mod:`pavlit.didactic.policy`).
        sft_gamma: The prover whose samples the SFT fits.
        sft_samples: Number of SFT samples.
        sft_iterations: SFT optimiser steps (Adam, batch ``sft_batch_size``); 0 skips SFT.
        sft_batch_size: SFT batch size.
        sft_lr: SFT learning rate **[pavlit]** (the paper does not give one).
        eval_every: Evaluate every this many iterations (and after the last).
        eval_rollouts: Samples per evaluation.
        pass_at: The k of the logged pass@k.
        seed: Seeds the policy's initialisation, the SFT data and the rollouts.
    """

    def __init__(
        self,
        gamma: float = 10.0,
        alpha: float = 1.0,
        advantage_source: Literal["exact", "mc"] = "exact",
        mc_rollouts: int = 100,
        baseline: Literal["none", "batch_mean"] = "none",
        batch_size: int = 64,
        iterations: int = 300,
        optimizer: OptimizerCallable = torch.optim.Adam,
        hidden_size: int = 128,
        n_layers: int = 3,
        head: Literal["masked", "per_position", "shared"] = "masked",
        sft_gamma: float = 5.0,
        sft_samples: int = 3200,
        sft_iterations: int = 50,
        sft_batch_size: int = 64,
        sft_lr: float = 1e-3,
        eval_every: int = 5,
        eval_rollouts: int = 512,
        pass_at: Sequence[int] = (8, 64),
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        if advantage_source not in ("exact", "mc"):
            raise ValueError(f"advantage_source must be 'exact' or 'mc', got {advantage_source!r}")
        if baseline not in ("none", "batch_mean"):
            raise ValueError(f"baseline must be 'none' or 'batch_mean', got {baseline!r}")
        if min(batch_size, iterations, eval_every, eval_rollouts, mc_rollouts) < 1:
            raise ValueError("batch_size, iterations, eval_every, eval_rollouts and mc_rollouts must be positive")
        self.optimizer_factory = optimizer
        self.task = PlantedTask()
        self.prover = PlantedProver(gamma, self.task)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.policy = MLPPolicy(self.task, hidden_size, n_layers, head)
        self.register_buffer("sft_done", torch.tensor(False))
        self.sft_metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._generator: torch.Generator | None = None
        self._eval_generator: torch.Generator | None = None

    def forward(self, tokens: torch.Tensor, n_written: torch.Tensor | int) -> torch.Tensor:
        """Next-token logits of the policy (see :meth:`MLPPolicy.forward`)."""
        return self.policy(tokens, n_written)

    @property
    def generator(self) -> torch.Generator:
        """The rollouts' random generator, on the module's device, seeded by ``seed + 1`` (SFT takes ``seed``)."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed + 1)
        return self._generator

    @property
    def eval_generator(self) -> torch.Generator:
        """A separate generator for evaluations, so that how often one evaluates never changes the training run."""
        if self._eval_generator is None or self._eval_generator.device != self.device:
            self._eval_generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed + 2)
        return self._eval_generator

    def run_sft(self) -> dict[str, float]:
        """Fine-tune the policy on the SFT prover once (idempotent) and return its evaluation (``sft/*``)."""
        if self.hparams.sft_iterations > 0 and not bool(self.sft_done):
            sft_generator = torch.Generator().manual_seed(self.hparams.seed)
            losses = supervised_finetune(
                self.policy,
                PlantedProver(self.hparams.sft_gamma, self.task),
                self.hparams.sft_samples,
                self.hparams.sft_iterations,
                self.hparams.sft_batch_size,
                self.hparams.sft_lr,
                sft_generator,
            )
            self.sft_done.fill_(True)
            metrics = evaluate_policy(
                self.policy, self.hparams.eval_rollouts, self.eval_generator, self.hparams.pass_at
            )
            self.sft_metrics = {"loss": losses[-1], **metrics}
        return self.sft_metrics

    def prover_advantages(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` prover advantages of every action of the rollouts (0 at masked steps)."""
        if self.hparams.advantage_source == "exact":
            prefix_values = prover_prefix_values(self.prover, tokens)
        else:
            prefix_values = mc_prover_prefix_values(self.prover, tokens, self.hparams.mc_rollouts, self.generator)
        return values.advantages(prefix_values, mask).to(torch.get_default_dtype())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step % self.hparams.eval_every == 0:
            self._evaluate()
        with torch.no_grad():
            tokens = self.policy.sample(self.hparams.batch_size, self.generator)
        outcome = self.task.reward(tokens)
        mask = action_mask(tokens, self.task.eos)
        a_mu = self.prover_advantages(tokens, mask)
        baseline = outcome.mean() if self.hparams.baseline == "batch_mean" else 0.0
        weights = step_weights(outcome, a_mu, mask, self.hparams.alpha, baseline)
        logits = self.policy.sequence_logits(tokens)
        log_probs_all = torch.log_softmax(logits, dim=-1)
        log_probs = log_probs_all.gather(-1, tokens[..., None]).squeeze(-1)
        loss = reinforce_loss(log_probs, weights, mask)
        with torch.no_grad():
            entropy = -(log_probs_all.exp() * log_probs_all).sum(-1)
            self.log_dict(
                {
                    "train/accuracy": outcome.mean(),
                    "train/loss": loss.detach(),
                    "train/a_mu_mean": masked_mean(a_mu, mask),
                    "train/a_mu_abs": masked_mean(a_mu.abs(), mask),
                    "train/weight_mean": masked_mean(weights, mask),
                    "train/entropy": masked_mean(entropy, mask),
                    "train/steps": mask.sum().clamp(min=1).to(torch.get_default_dtype()) / tokens.shape[0],
                },
                on_step=True,
                prog_bar=False,
            )
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.policy.parameters())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Iterations(self.hparams.iterations), batch_size=None, shuffle=False)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.run_sft()

    def on_train_epoch_end(self) -> None:
        self._evaluate(in_step=False)

    def _evaluate(self, in_step: bool = True) -> None:
        step = self.global_step
        if self.history and self.history[-1]["iteration"] == step:
            return
        metrics = evaluate_policy(self.policy, self.hparams.eval_rollouts, self.eval_generator, self.hparams.pass_at)
        self.history.append({"iteration": step, **metrics})
        logged = {f"eval/{name}": value for name, value in metrics.items()}
        if step == 0:
            logged.update({f"sft/{name}": value for name, value in self.sft_metrics.items()})
        self.log_dict(logged, on_step=in_step, on_epoch=not in_step)
