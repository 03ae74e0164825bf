"""The settings groups ``pavlit label`` and ``pavlit search`` share: how rollouts are sampled, where the job runs."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pavlit.policy.backends import SamplingSettings


@dataclass
class SamplerArgs:
    """Sampling settings shared by every rollout of a job.

    Args:
        temperature: Softmax temperature (1 = the policy's own distribution, which MC labels must use).
        top_p: Nucleus mass (1 = off).
        max_batch: Most sequences decoded at once (bounds memory; part of the seeding, so fixed per job).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_batch: int = 256

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"SamplerArgs.temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplerArgs.top_p must be in (0, 1], got {self.top_p}")
        if self.max_batch < 1:
            raise ValueError(f"SamplerArgs.max_batch must be >= 1, got {self.max_batch}")

    def settings(self, max_new_tokens: int, delimiter: str) -> SamplingSettings:
        """The sampling engine's settings for responses of at most ``max_new_tokens`` cut at ``delimiter``."""
        from pavlit.policy.backends import SamplingSettings

        return SamplingSettings(
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=max_new_tokens,
            max_batch=self.max_batch,
            delimiter=delimiter,
        )


@dataclass
class LaunchArgs:
    """Where the job runs; ranks split the chunks (``--trainer.devices 2`` runs two processes).

    Args:
        accelerator: ``cpu`` or ``cuda``.
        devices: Processes per node.
        num_nodes: Nodes (launch one command per node, e.g. with SLURM or torchrun-style environment variables).
    """

    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1

    def launch(self) -> Any:
        """Start the job's processes with Lightning Fabric and return this process's ``Fabric``.

        On CPU with several processes per node, each gets an equal share of the cores as torch threads
        (spinning OpenMP threads that outnumber the cores slow small models down by an order of magnitude).
        """
        import torch
        from lightning.fabric import Fabric

        world = self.devices * self.num_nodes
        fabric = Fabric(
            accelerator=self.accelerator,
            devices=self.devices,
            num_nodes=self.num_nodes,
            strategy="ddp" if world > 1 else "auto",
        )
        fabric.launch()
        if fabric.device.type == "cpu" and fabric.world_size > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.devices))
        return fabric


def check_num_problems(field: str, num_problems: int | None) -> None:
    """``num_problems`` is ``None`` (the whole split) or a positive count (``-1`` would silently drop the last)."""
    if num_problems is not None and (isinstance(num_problems, bool) or num_problems < 1):
        raise ValueError(f"{field} must be >= 1 (or null for the whole split), got {num_problems}")
