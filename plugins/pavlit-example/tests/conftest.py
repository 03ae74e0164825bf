"""Shared fixtures of the example plugin's tests."""

from __future__ import annotations

import os

import pytest

# The models in these tests are tiny: extra intra-op threads only add synchronisation on shared CPU cores.
# One thread per process, inherited by the `pavlit` subprocesses the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

DISTRIBUTION = "pavlit-example"

# Repeatable property-test examples, as in pavlit's own suite (HYPOTHESIS_PROFILE=explore for fresh ones).
from hypothesis import settings  # noqa: E402

settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture
def installed() -> None:
    """Fail with the fix when this package's entry points are not visible (it was imported from a path instead)."""
    from pavlit import registry

    try:
        plugin = registry.info("pavlit.provers", "mixture")
    except registry.PluginError as err:
        pytest.fail(f"{err}\ninstall this package first: pip install -e plugins/pavlit-example")
    assert plugin.distribution == DISTRIBUTION, plugin
