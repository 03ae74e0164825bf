"""What the verifiers' DataModules share: the tokenizer they take from the model, padding, resumable loaders."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler

from pavlit.data.reading import BadRecords
from pavlit.modules.checks import check_validation_data
from pavlit.steps import pad_id_of

__all__ = ["ResumableSampler", "keep_settings", "resume_offset", "setup_once", "start_prepare"]

log = logging.getLogger(__name__)


class ResumableSampler(DistributedSampler):
    """A seeded, per-epoch shuffling sampler over this rank's share of the data that can resume mid-epoch.

    It is a ``DistributedSampler`` (so Lightning leaves it in place under DDP) built with explicit rank and world
    size. :meth:`skip` makes the next iteration start after the batches a checkpointed run had already trained on,
    so ``--ckpt_path`` resumes to the same weights as an uninterrupted run.
    """

    def __init__(self, dataset: Sequence[Any], num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self._skip = 0

    def skip(self, n_samples: int) -> None:
        """Leave out the first ``n_samples`` indices of the next iteration only."""
        self._skip = n_samples

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        # __len__ stays the full epoch: Lightning counts the restored batches as already done.
        return iter(indices[skip:])


def resume_offset(trainer: Any) -> int:
    """Batches of the current epoch a restored run already trained on (0 for a fresh run or at an epoch start)."""
    if trainer is None or getattr(trainer, "ckpt_path", None) is None:
        return 0
    # `processed`, not `completed`: a checkpoint saved in on_train_batch_end (ModelCheckpoint every_n_train_steps)
    # holds a batch that has stepped the optimizer but is not yet counted as completed.
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return int(progress.processed)


def keep_settings(datamodule: Any) -> None:
    """Check a verifier DataModule's settings (its saved ``hparams``), keep each as an attribute, and start empty.

    Checks what every verifier DataModule takes: ``val_fraction`` in [0, 1) and the ``on_bad_record`` mode.
    """
    settings = dict(datamodule.hparams)
    if not 0.0 <= settings["val_fraction"] < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {settings['val_fraction']}")
    BadRecords(settings["on_bad_record"])  # validates the mode now, not at setup
    for name, value in settings.items():
        setattr(datamodule, name, value)
    datamodule.tokenizer = None
    datamodule.train_examples = []
    datamodule.val_examples = []
    datamodule.weights = (1.0, 1.0)
    datamodule.stats = Counter()


def setup_once(datamodule: Any) -> None:
    """A verifier DataModule's ``setup``: take its model's tokenizer, then ``prepare`` the examples (once).

    The tokenizer is ``trainer.lightning_module.tokenizer`` unless one was set by hand; ``max_length`` is capped at
    the model's ``max_positions`` when it has them.

    Raises:
        RuntimeError: No tokenizer set, and no trainer with a model that has one.
    """
    if datamodule.train_examples or datamodule.val_examples:
        return
    if datamodule.tokenizer is None:
        module = datamodule.trainer.lightning_module if datamodule.trainer is not None else None
        if getattr(module, "tokenizer", None) is None:
            name = type(datamodule).__name__
            raise RuntimeError(f"{name} needs a tokenizer: attach it to a trainer with a verifier")
        datamodule.tokenizer = module.tokenizer
        model_limit = getattr(module, "max_positions", None)
        if model_limit is not None and model_limit < datamodule.max_length:
            log.info("capping max_length %d at the model's %d positions", datamodule.max_length, model_limit)
            datamodule.max_length = int(model_limit)
    datamodule.prepare(datamodule.tokenizer)


def start_prepare(datamodule: Any, tokenizer: Any, what: str) -> BadRecords:
    """The start of a verifier DataModule's ``prepare``: refuse a tokenizer that cannot pad before reading any data,
    keep it, and return a fresh bad-record policy for records of kind ``what``."""
    pad_id_of(tokenizer)
    datamodule.tokenizer = tokenizer
    return BadRecords(datamodule.on_bad_record, what)


def train_loader(datamodule: Any, examples: Sequence[Any], collate: Callable) -> tuple[DataLoader, ResumableSampler]:
    """This rank's shuffled training batches, resuming mid-epoch after a restored checkpoint."""
    trainer = datamodule.trainer
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = ResumableSampler(examples, world, rank, shuffle=True, seed=datamodule.seed)
    sampler.skip(resume_offset(trainer) * datamodule.batch_size)
    return _loader(datamodule, examples, collate, sampler), sampler


def val_loader(datamodule: Any, examples: Sequence[Any], collate: Callable) -> DataLoader:
    """This rank's validation batches, in a fixed order (an empty validation set is refused)."""
    check_validation_data(datamodule, examples, f"data.val_fraction is {datamodule.val_fraction}; raise it")
    trainer = datamodule.trainer
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = DistributedSampler(examples, num_replicas=world, rank=rank, shuffle=False)
    return _loader(datamodule, examples, collate, sampler)


def _loader(datamodule: Any, examples: Sequence[Any], collate: Callable, sampler: Any) -> DataLoader:
    workers = datamodule.num_workers
    return DataLoader(
        examples,
        batch_size=datamodule.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
