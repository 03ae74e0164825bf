"""``PolicyRLModule``: online REINFORCE on the policy's own rollouts with dense reward ``R + α·Â^μ`` (method.md §6).

``pavlit fit --config configs/tiny/rl.yaml`` pairs it with :class:`pavlit.data.prompts.PromptDataModule`. Every
training step takes a batch of prompts and

1. samples ``samples_per_prompt`` responses per prompt from the current policy (pavlit's
   :class:`~pavlit.policy.sampler.Sampler`, eval mode, no grad), scores each with the task's checker (``R``),
   splits it into steps and asks the injected :class:`~pavlit.interfaces.AdvantageSource` for ``Q^μ`` of every prefix;
2. weights every token of step ``h`` with ``w = R + α·Â^μ(s_h, a_h) − b`` (``reward_form="q_mu"``: ``Q^μ(s_h, a_h)``
   instead of ``Â^μ``, the paper's collapse ablation; no source: α·0, ORM-RL). The baseline ``b`` is a linear
   value head on the policy's (detached) last hidden state before each token, regressed with a squared loss onto
   that token's ``R + α·Â^μ``; or the mean outcome of the prompt's other samples (``leave_one_out``); or 0;
3. minimises ``−Σ w_t log π(a_t)`` (optionally PPO-clipped against the policy that sampled the rollouts, reused for
   ``ppo_epochs`` steps), plus the value loss, with a KL penalty toward the frozen reference (default: a copy of
   the initial, RFT, policy): ``k1`` subtracts ``kl_coef·(log π − log π_ref)`` from each token's weight, ``k2`` /
   ``k3`` add ``kl_coef·mean(k)`` to the loss (:func:`pavlit.policy_gradient.kl_penalty`). The batch and the steps
   on it that need no model are in :mod:`pavlit.modules.rollout_batch`; the maths in :mod:`pavlit.policy_gradient`.

Log-probabilities are those of the sampling distribution (logits divided by ``temperature``). Logged per step
(``train/``): ``accuracy``, ``reward/outcome``, ``reward/process`` (mean ``α·Â^μ`` per step), ``kl``, ``entropy``,
``advantage`` (mean token weight), ``steps`` and ``tokens`` per response, ``samples`` (rollouts so far), losses.
Validation samples ``eval_samples`` responses per problem of the datamodule's validation split and logs
``val/accuracy`` (unbiased pass@1) and ``val/pass@k``; each evaluation is kept in :attr:`PolicyRLModule.history`.
At the end of training the policy is exported to ``<default_root_dir>/policy`` with ``metrics.json``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule

from pavlit.advantages import AdvantageSource  # imports PAVAdvantages, MCAdvantages: YAML can name them by short name
from pavlit.data.prompts import PromptBatch
from pavlit.interfaces import Problem, Task
from pavlit.models.adapters import LoRAArgs, apply_lora
from pavlit.modules.checks import check_optimisation
from pavlit.modules.optim import LRSchedulerCallable, OptimizerCallable, configure_optimization
from pavlit.modules.rollout_batch import (
    Rollouts,
    at_response_tokens,
    collate_rollouts,
    pass_at_k_sums,
    process_terms,
    reference_kl,
    response_logprobs,
    rollout_metrics,
    token_targets,
)
from pavlit.modules.sft import export_run
from pavlit.policy.backends import PavlitBackend, SamplerBackend, SamplingSettings
from pavlit.policy.loading import Policy
from pavlit.policy.sampler import Sampler
from pavlit.policy.sources import ModelSource, TinyPolicy
from pavlit.policy_gradient import KLEstimator, leave_one_out_baseline, masked_mean, policy_gradient_loss
from pavlit.steps import split_steps

__all__ = ["PolicyRLModule", "Rollouts"]


class PolicyRLModule(LightningModule):
    """REINFORCE with dense process rewards from a prover's advantages (PAV-RL), or outcome only (ORM-RL).

    Args:
        policy: The initial policy (the RFT model; docs/method.md §6).
        reference: The KL anchor; ``None``: a frozen copy of the initial policy.
        task: Scores rollouts; ``None``: the datamodule's ``task``.
        advantages: Source of ``Q^μ`` (``PAVAdvantages`` or ``MCAdvantages``, :mod:`pavlit.advantages`); ``None``:
            ORM-RL.
        alpha: Weight of the process term (paper: 5 for a 2B policy, 3 for 9B).
        reward_form: ``"advantage"`` (``Â^μ``, the method) or ``"q_mu"`` (``Q^μ`` of the step, the failure mode).
        samples_per_prompt: Rollouts per prompt and step.
        baseline: ``"value_head"`` (the paper), ``"leave_one_out"`` (mean outcome of the prompt's other samples)
            or ``"none"``.
        kl_coef: Weight of the KL penalty toward ``reference`` (paper: 0.001); 0 loads no reference.
        kl_estimator: ``"k1"`` (in the reward), ``"k2"`` or ``"k3"`` (in the loss); see
            :func:`pavlit.policy_gradient.kl_penalty`.
        clip: PPO ratio clipping ε (``None``: plain REINFORCE, the paper).
        ppo_epochs: Optimizer steps per batch of rollouts (the prompt batches that arrive meanwhile are not
            rolled out); > 1 is where ``clip`` matters.
        loss_normalization: Divide the policy loss by the batch's response tokens or by its responses.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay on matrices.
        warmup_steps: Linear warm-up steps, then cosine decay to 0 over the run.
        temperature: Sampling temperature of the rollouts (> 0).
        max_new_tokens: Cap on a response's tokens.
        max_steps: Stop a response after this many steps (``None``: at EOS or ``max_new_tokens``).
        max_batch: Rows the sampler decodes at once.
        eval_samples: Responses per validation problem (``val/pass@{eval_samples}``).
        eval_temperature: Temperature of validation samples.
        lora: Train LoRA adapters instead of all weights.
        seed: Seed of the rollouts (each step and rank draws from its own stream).
        export: Save ``<default_root_dir>/policy`` and ``metrics.json`` when training ends.
        backend: The rollout engine (default: pavlit's ``Sampler`` on the training weights themselves;
            ``pavlit.policy.backends.VLLMBackend`` on a GPU, whose weights are refreshed before every rollout).
        optimizer: Builds another optimizer from the parameters (default AdamW at ``lr``; :mod:`pavlit.modules.optim`).
        lr_scheduler: Builds another schedule from the optimizer (default warm-up + cosine), stepped every step.
    """

    def __init__(
        self,
        policy: ModelSource = TinyPolicy(),  # noqa: B008 - an immutable description, not a model
        reference: ModelSource | None = None,
        task: Task | None = None,
        advantages: AdvantageSource | None = None,
        alpha: float = 5.0,
        reward_form: Literal["advantage", "q_mu"] = "advantage",
        samples_per_prompt: int = 4,
        baseline: Literal["value_head", "leave_one_out", "none"] = "value_head",
        kl_coef: float = 0.001,
        kl_estimator: KLEstimator = "k1",
        clip: float | None = None,
        ppo_epochs: int = 1,
        loss_normalization: Literal["tokens", "responses"] = "tokens",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        temperature: float = 1.0,
        max_new_tokens: int = 128,
        max_steps: int | None = None,
        max_batch: int = 256,
        eval_samples: int = 4,
        eval_temperature: float = 1.0,
        lora: LoRAArgs = LoRAArgs(),  # noqa: B008
        seed: int = 0,
        export: bool = True,
        backend: SamplerBackend | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        check_optimisation("PolicyRLModule", lr, weight_decay, warmup_steps)
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        if reward_form not in ("advantage", "q_mu"):
            raise ValueError(f"reward_form must be 'advantage' or 'q_mu', got {reward_form!r}")
        if baseline not in ("value_head", "leave_one_out", "none"):
            raise ValueError(f"baseline must be 'value_head', 'leave_one_out' or 'none', got {baseline!r}")
        if baseline == "leave_one_out" and samples_per_prompt < 2:
            raise ValueError("baseline='leave_one_out' needs samples_per_prompt >= 2")
        if samples_per_prompt < 1 or ppo_epochs < 1 or eval_samples < 1 or temperature <= 0 or kl_coef < 0:
            raise ValueError("need samples_per_prompt, ppo_epochs, eval_samples >= 1, temperature > 0, kl_coef >= 0")
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be positive or None, got {clip}")
        self.task = task
        self.advantages = advantages
        model, self.tokenizer = policy.load()
        if kl_coef > 0:
            ref_model = reference.load().model if reference is not None else copy.deepcopy(model)
            self.reference_model = ref_model.eval().requires_grad_(False)
        else:
            self.reference_model = None
        # Loaders return eval-mode models and Lightning keeps submodules' modes, so dropout would stay off.
        self.model = apply_lora(model, lora).train()
        self.value_head = torch.nn.Linear(self._hidden_size(), 1) if baseline == "value_head" else None
        if self.value_head is not None:
            torch.nn.init.zeros_(self.value_head.weight)  # baseline 0 until it has learnt something
            torch.nn.init.zeros_(self.value_head.bias)
        #: One row per evaluation: ``{"step", "samples", "split", "accuracy", "pass@k"}``.
        self.history: list[dict[str, Any]] = []
        self.samples_seen = 0
        self.sampler_backend = backend or PavlitBackend()
        self._sampler: Sampler | None = None
        self._sampler_step = -1  # the global step whose weights the sampler holds
        self._buffer: Rollouts | None = None
        self._buffer_uses = 0
        self._eval_sums: list[torch.Tensor] = []
        #: ``[B, T]`` token weights ``w_t`` of the last :meth:`rollout_loss` call (for inspection and tests).
        self.last_weights: torch.Tensor | None = None

    def _hidden_size(self) -> int:
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits ``[B, L, V]`` and last hidden states ``[B, L, D]``."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True)
        return out.logits, out.hidden_states[-1]

    # --- training ----------------------------------------------------------------------------------------------

    def training_step(self, batch: PromptBatch, batch_idx: int) -> torch.Tensor:
        if self._buffer is None or self._buffer_uses >= self.hparams.ppo_epochs:
            self._buffer, self._buffer_uses = self.rollouts(batch.problems), 0
            self.samples_seen += len(self._buffer.outcome) * self.trainer.world_size
        self._buffer_uses += 1
        loss, metrics = self.rollout_loss(self._buffer)
        metrics["samples"] = torch.tensor(float(self.samples_seen))
        self.log_dict({f"train/{name}": value for name, value in metrics.items()}, batch_size=len(batch))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    @torch.no_grad()
    def rollouts(self, problems: Sequence[Problem]) -> Rollouts:
        """Sample ``samples_per_prompt`` responses per problem from the current policy, score them, get ``Q^μ``."""
        n = self.hparams.samples_per_prompt
        task = self._task()
        sampler = self.sampler()
        seed = self.hparams.seed + 100_003 * (self.global_step + 1) + self.global_rank
        was_training = self.model.training
        self.model.eval()
        try:
            out = sampler.complete(
                [p.prompt for p in problems],
                n=n,
                max_new_tokens=self.hparams.max_new_tokens,
                max_steps=self.hparams.max_steps,
                temperature=self.hparams.temperature,
                delimiter=task.step_delimiter,
                seed=seed,
            )
            rows = [
                (p, text, ids)
                for p, texts, ids in zip(problems, out.texts, out.token_ids)
                for text, ids in zip(texts, ids)
            ]
            rollout_problems = [p for p, _, _ in rows]
            steps = [split_steps(text, task.step_delimiter) for _, text, _ in rows]
            process = self._process_values(rollout_problems, steps, task, sampler, seed)
        finally:
            self.model.train(was_training)
        outcomes = [task.score(p, text) for p, text, _ in rows]
        batch = self.build_rollouts(rollout_problems, [ids for _, _, ids in rows], steps, outcomes, process)
        return batch.to(self.device)

    def build_rollouts(
        self,
        problems: Sequence[Problem],
        response_ids: Sequence[Sequence[int]],
        steps: Sequence[Sequence[str]],
        outcomes: Sequence[float],
        process: Sequence[torch.Tensor],
    ) -> Rollouts:
        """Tokenise and pad scored rollouts with the policy's tokenizer (:func:`collate_rollouts`), on the CPU."""
        return collate_rollouts(
            problems, response_ids, steps, outcomes, process, self.tokenizer, self.hparams.samples_per_prompt
        )

    def rollout_loss(self, batch: Rollouts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss on scored rollouts and the metrics to log (token weights under ``"weights"``)."""
        hp = self.hparams
        logits, hidden = self(batch.input_ids, batch.attention_mask)
        logp, entropy = response_logprobs(logits, batch, hp.temperature, with_entropy=True)
        mask = batch.token_mask
        targets = token_targets(batch, hp.alpha)
        value_loss = torch.zeros((), device=logp.device)
        if hp.baseline == "value_head":
            values = self.value_head(at_response_tokens(hidden.detach(), batch.positions).float()).squeeze(-1)
            value_loss = masked_mean((values - targets) ** 2, mask)
            baseline = values.detach()
        elif hp.baseline == "leave_one_out":
            baseline = leave_one_out_baseline(batch.outcome.view(-1, batch.samples_per_prompt)).view(-1, 1)
        else:
            baseline = torch.zeros_like(targets)
        weights = targets - baseline
        kl = kl_loss = torch.zeros((), device=logp.device)
        if self.reference_model is not None:
            with torch.no_grad():
                self.reference_model.eval()
                ref_logits = self.reference_model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ).logits
                ref_logp, _ = response_logprobs(ref_logits, batch, hp.temperature)
            weight_penalty, kl_loss, kl = reference_kl(logp, ref_logp, mask, hp.kl_coef, hp.kl_estimator)
            weights = weights - weight_penalty
        weights = torch.where(mask, weights, torch.zeros_like(weights))
        if batch.old_logp is None:
            batch.old_logp = logp.detach()
        pg_loss = policy_gradient_loss(logp, weights, mask, batch.old_logp, hp.clip, hp.loss_normalization)
        loss = pg_loss + value_loss + kl_loss
        metrics = rollout_metrics(batch, weights, entropy, hp.alpha, loss=loss, pg_loss=pg_loss, value_loss=value_loss)
        metrics["kl"] = kl
        self.last_weights = weights.detach()
        return loss, metrics

    def _process_values(
        self, problems: Sequence[Problem], steps: Sequence[list[str]], task: Task, sampler: Sampler, seed: int
    ) -> list[torch.Tensor]:
        if self.advantages is None:
            return [torch.zeros(len(item)) for item in steps]
        q_mu = self.advantages.prefix_values(problems, steps, task=task, sampler=sampler, seed=seed)
        return process_terms(q_mu, self.hparams.reward_form)

    # --- validation / test -------------------------------------------------------------------------------------

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def test_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._evaluate(batch)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    @torch.no_grad()
    def _evaluate(self, batch: PromptBatch) -> None:
        if self.trainer.sanity_checking:
            return
        k = self.hparams.eval_samples
        out = self.sampler().complete(
            [p.prompt for p in batch.problems],
            n=k,
            max_new_tokens=self.hparams.max_new_tokens,
            max_steps=self.hparams.max_steps,
            temperature=self.hparams.eval_temperature,
            delimiter=self._task().step_delimiter,
            seed=self.hparams.seed + 7919 * (len(self._eval_sums) + 1) + self.global_rank,
        )
        counts = [sum(self._task().score(p, t) >= 1.0 for t in texts) for p, texts in zip(batch.problems, out.texts)]
        self._eval_sums.append(pass_at_k_sums(counts, k))

    def _log_evaluation(self, prefix: str) -> None:
        if self.trainer.sanity_checking:
            return
        sums = torch.stack(self._eval_sums).sum(0) if self._eval_sums else torch.zeros(3, dtype=torch.float64)
        self._eval_sums = []
        total, pass1, passk = self.trainer.strategy.reduce(sums.to(self.device), reduce_op="sum").tolist()
        if not total:
            return
        k = self.hparams.eval_samples
        self.log(f"{prefix}/accuracy", pass1 / total, prog_bar=True, rank_zero_only=True)
        self.log(f"{prefix}/pass@{k}", passk / total, rank_zero_only=True)
        self.history.append(
            {"step": self.global_step, "samples": self.samples_seen, "split": prefix, "problems": int(total)}
            | {"accuracy": pass1 / total, f"pass@{k}": passk / total}
        )

    # --- optimisation and hooks --------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_optimization(self, (p for n, p in self.named_parameters() if not n.startswith("reference")))

    def setup(self, stage: str) -> None:
        self._task()
        if self.hparams.ppo_epochs > 1 and self.trainer.accumulate_grad_batches > 1:
            raise ValueError("ppo_epochs > 1 reuses rollouts across optimizer steps; use accumulate_grad_batches=1")

    def on_train_end(self) -> None:
        if not self.hparams.export or not self.trainer.is_global_zero:
            return
        extra = {"samples": self.samples_seen, "history": self.history}
        paths, _ = export_run(self, ("val/", "train/"), extra)
        self.print(f"RL: exported the policy to {paths['policy']}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["pavlit_rl"] = {"samples_seen": self.samples_seen, "history": self.history}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("pavlit_rl", {})
        self.samples_seen = state.get("samples_seen", 0)
        self.history = list(state.get("history", []))

    def sampler(self) -> Sampler:
        """The policy's sampler on the module's device (created on first use; it shares the training weights)."""
        if self._sampler is None or self._sampler.device != self.device:
            settings = SamplingSettings(
                temperature=self.hparams.temperature,
                max_new_tokens=self.hparams.max_new_tokens,
                max_batch=self.hparams.max_batch,
                seed=self.hparams.seed,
                delimiter=self._task().step_delimiter,
            )
            self._sampler = self.sampler_backend.build(Policy(self.model, self.tokenizer), settings, self.device)
            self.model.train(self.training)  # the Sampler switches the model to eval mode
        elif self._sampler_step != self.global_step:
            # An engine with its own copy of the weights (vLLM) gets the updated ones; pavlit's Sampler has them.
            self.sampler_backend.refresh(self._sampler, self.model)
        self._sampler_step = self.global_step
        return self._sampler

    def _task(self) -> Task:
        if self.task is None:
            self.task = getattr(self.trainer.datamodule, "task", None) if self._trainer is not None else None
            if self.task is None:
                raise ValueError("PolicyRLModule needs a task: pass task=... or use a datamodule with a .task")
        return self.task
