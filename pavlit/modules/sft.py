"""The base policy: supervised fine-tuning (SFT, or RFT on correct rollouts) of a causal LM, with sampled pass@k.

``pavlit fit --config configs/tiny/sft.yaml`` trains :class:`SFTModule` on an
:class:`pavlit.data.sft.SFTDataModule` and, at the end, exports the policy as a Hugging Face folder that every
later stage loads with ``Pretrained(path=<run>/policy)``::

    <trainer.default_root_dir>/
        policy/           model.save_pretrained + tokenizer (with LoRA: the adapters merged into the base)
        policy_adapter/   only with LoRA: the adapter alone, for Pretrained(path=<base>, adapter_path=...)
        metrics.json      the last validation metrics (val/loss, val/pass@1, val/pass@k), step and epoch

Validation reports the token loss on the reference solutions and, every validation epoch (not during the
sanity check), *sampled* accuracy: ``eval_samples`` responses per problem at temperature 1 on the first
``eval_problems`` problems of the validation split, scored by the task's checker, as unbiased pass@1 and pass@k.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

from pavlit.interfaces import Problem, Task
from pavlit.jobs.atomic import atomic_write_text
from pavlit.models.adapters import LoRAArgs, apply_lora, count_parameters, save_adapter
from pavlit.modules.checks import check_optimisation
from pavlit.modules.losses import causal_lm_loss
from pavlit.modules.optim import LRSchedulerCallable, OptimizerCallable, configure_optimization
from pavlit.policy.sampler import Sampler
from pavlit.policy.sources import ModelSource, TinyPolicy

__all__ = ["SFTModule", "export_policy", "export_run", "pass_at_k", "sample_correct_counts"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021).

    Computed as a product so that it is exact in floating point for any ``n``; needs ``1 <= k <= n``.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def sample_correct_counts(
    sampler: Sampler, task: Task, problems: Sequence[Problem], n: int, max_new_tokens: int
) -> list[int]:
    """For each problem, how many of ``n`` responses sampled from ``sampler`` the task scores as correct."""
    if not problems:
        return []
    out = sampler.complete([p.prompt for p in problems], n=n, max_new_tokens=max_new_tokens)
    return [sum(task.score(p, text) >= 1.0 for text in texts) for p, texts in zip(problems, out.texts, strict=True)]


def export_policy(model: torch.nn.Module, tokenizer: Any, root: str | Path) -> dict[str, str]:
    """Save ``model`` + ``tokenizer`` as a Hugging Face folder ``root/policy`` that ``Pretrained`` reloads.

    A peft (LoRA) model is saved twice: the adapter alone in ``root/policy_adapter``, and a copy with the
    adapters merged into the base weights in ``root/policy`` (the training model itself is left unmerged).

    Returns:
        ``{"policy": <folder>}`` plus ``"adapter"`` for a LoRA model.
    """
    from peft import PeftModel

    root = Path(root)
    paths = {"policy": str(root / "policy")}
    if isinstance(model, PeftModel):
        paths["adapter"] = str(save_adapter(model, root / "policy_adapter"))
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(paths["policy"])
    tokenizer.save_pretrained(paths["policy"])
    return paths


def export_run(module: Any, prefixes: tuple[str, ...], extra: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """Export ``module.model`` (:func:`export_policy`) and write ``<default_root_dir>/metrics.json`` atomically.

    ``metrics.json`` holds the last logged scalar metrics whose names start with ``prefixes``, ``global_step``,
    ``extra`` and the export's paths. Returns ``(paths, metrics)``.
    """
    trainer = module.trainer
    root = Path(trainer.default_root_dir or trainer.log_dir or ".")
    paths = export_policy(module.model, module.tokenizer, root)
    metrics = {
        name: float(value)
        for name, value in trainer.callback_metrics.items()
        if name.startswith(prefixes) and value.numel() == 1
    }
    summary = {**metrics, "global_step": module.global_step, **extra, **paths}
    atomic_write_text(root / "metrics.json", json.dumps(summary, indent=2) + "\n")
    return paths, metrics


class SFTModule(LightningModule):
    """Supervised fine-tuning of the base policy: causal-LM loss on response tokens, sampled pass@k in validation.

    Pair it with :class:`pavlit.data.sft.SFTDataModule` (reference solutions for SFT, or a run's correct rollouts
    for RFT); pass@k reads the problems from the datamodule's ``task`` and ``validation_split``.

    Args:
        source: Where the policy comes from (``TinyPolicy``, ``Pretrained``, ``Gemma3_270M``).
        lora: Train LoRA adapters instead of all weights (export then writes the adapter and a merged folder).
        lr: Peak learning rate of the default optimizer (AdamW).
        weight_decay: AdamW weight decay, applied to matrices only (not to norms or biases).
        warmup_steps: Linear warm-up steps before the cosine decay to 0 over the run's optimizer steps.
        eval_problems: Validation problems on which pass@k is sampled each validation epoch (0: off).
        eval_samples: Responses sampled per problem (temperature 1); logged as ``val/pass@1`` and
            ``val/pass@{eval_samples}``.
        eval_max_new_tokens: Cap on a sampled response's tokens.
        export: At the end of training, save the policy to ``<default_root_dir>/policy`` and ``metrics.json``.
        optimizer: Builds another optimizer from the parameters (see :mod:`pavlit.modules.optim`).
        lr_scheduler: Builds another schedule from the optimizer, stepped every optimizer step.
    """

    def __init__(
        self,
        source: ModelSource = TinyPolicy(),
        lora: LoRAArgs = LoRAArgs(),
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        eval_problems: int = 64,
        eval_samples: int = 4,
        eval_max_new_tokens: int = 128,
        export: bool = True,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        check_optimisation("SFTModule", lr, weight_decay, warmup_steps)
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        if eval_samples < 1 or eval_problems < 0 or warmup_steps < 0:
            raise ValueError("need eval_samples >= 1, eval_problems >= 0 and warmup_steps >= 0")
        model, self.tokenizer = source.load()
        # Loaders return eval-mode models and Lightning keeps submodules' modes, so dropout would stay off.
        self.model = apply_lora(model, lora).train()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits ``[batch, seq, vocab]``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, n_tokens = causal_lm_loss(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=int(n_tokens))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n_tokens = causal_lm_loss(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        # Weighting each batch by its token count makes the epoch value the exact per-token mean.
        self.log("val/loss", loss, prog_bar=True, batch_size=int(n_tokens), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self.hparams.eval_problems == 0:
            return
        datamodule = self.trainer.datamodule
        task: Task | None = getattr(datamodule, "task", None)
        if task is None:
            return
        k = self.hparams.eval_samples
        problems = task.problems(getattr(datamodule, "validation_split", "validation"))[: self.hparams.eval_problems]
        # Each rank samples its own share of the problems; the sums are added up across ranks.
        shard = problems[self.global_rank :: self.trainer.world_size]
        sampler = Sampler(self.model, self.tokenizer, temperature=1.0, seed=self.global_rank)
        counts = sample_correct_counts(sampler, task, shard, k, self.hparams.eval_max_new_tokens)
        sums = torch.tensor(
            [len(counts), sum(pass_at_k(k, c, 1) for c in counts), sum(pass_at_k(k, c, k) for c in counts)],
            dtype=torch.float64,
            device=self.device,
        )
        total, pass1, passk = self.trainer.strategy.reduce(sums, reduce_op="sum").tolist()
        if total:
            self.log("val/pass@1", pass1 / total, prog_bar=True, rank_zero_only=True)
            if k > 1:
                self.log(f"val/pass@{k}", passk / total, rank_zero_only=True)

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_optimization(self)

    def on_fit_start(self) -> None:
        trainable, total = count_parameters(self.model)
        self.print(f"SFT: training {trainable:,} of {total:,} parameters")

    def on_train_end(self) -> None:
        if not self.hparams.export or not self.trainer.is_global_zero:
            return
        paths, metrics = export_run(self, ("val/",), {"epoch": self.current_epoch})
        self.print(f"SFT: exported the policy to {paths['policy']} ({json.dumps(metrics)})")
