"""Shared fixtures."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

# The suite's models are tiny: intra-op threads only add OpenMP synchronisation, and when cores are shared
# (CI's 2 cores, pytest's own subprocesses) spinning threads slow matmuls down by more than an order of
# magnitude. One thread per process, inherited by the subprocesses tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

FIXTURES_DIR = Path(__file__).parent / "fixtures"

# Property tests draw the same examples on every run (CI must not fail by chance on a case no one has seen);
# HYPOTHESIS_PROFILE=explore draws fresh random ones to hunt for new counterexamples.
from hypothesis import settings  # noqa: E402

settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


def sharpened(model: torch.nn.Module) -> torch.nn.Module:
    """A random tiny Llama made sensitive to decoding bugs, in eval mode.

    With tied embeddings a random model just repeats its last token, which would hide padding and position bugs;
    an independent random output layer gives varied greedy text and non-uniform distributions. Sharp attention
    makes outputs depend on positions and masks (near-uniform attention would hide those bugs).
    """
    generator = torch.Generator().manual_seed(0)
    model.lm_head.weight = torch.nn.Parameter(0.5 * torch.randn(model.lm_head.weight.shape, generator=generator))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module")
def char_tokenizer():
    """The arithmetic task's character tokenizer."""
    from pavlit.policy.tokenizer import build_char_tokenizer
    from pavlit.tasks.arithmetic import ALPHABET

    return build_char_tokenizer(ALPHABET)


@pytest.fixture(scope="module")
def sharp_tiny_model(char_tokenizer):
    """A 2-layer, width-32 tiny policy, :func:`sharpened`."""
    from pavlit.policy.loading import tiny_policy

    return sharpened(tiny_policy(char_tokenizer, n_layer=2, n_embd=32, n_head=2, seed=0))


# Prompts of different lengths (one a single character), so batches are left-padded.
DECODE_PROMPTS = ["Compute 3+4.\n", "Compute (12*3)-5.\n36-5\n", "C", "Compute ((4+4)*(5-1))-17+2.\n8*4\n"]


@pytest.fixture(scope="module")
def tokenizer(char_tokenizer):
    """The sampler tests' tokenizer: :func:`char_tokenizer`."""
    return char_tokenizer


@pytest.fixture(scope="module")
def model(sharp_tiny_model):
    """The sampler tests' model: :func:`sharp_tiny_model`."""
    return sharp_tiny_model


@pytest.fixture
def fixtures_on_path(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put ``tests/fixtures`` on ``sys.path`` so YAML configs can name its classes (``pavlit_toy_modules.ToyData``)."""
    monkeypatch.syspath_prepend(str(FIXTURES_DIR))
    return FIXTURES_DIR


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], str]:
    """Write an importable module ``name`` with ``source`` into a temp dir on ``sys.path``; returns ``name``.

    Use a name unique to the test: the module stays in ``sys.modules`` once imported.
    """
    folder = tmp_path / "modules"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))

    def make(name: str, source: str) -> str:
        assert name not in sys.modules, f"module name {name!r} is already taken"
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        return name

    return make


DEMO_PLUGIN = {
    "distribution": "pavlit-demo-prover",
    "version": "0.3.1",
    "package": "pavlit_demo_prover",
    "entry_points": {"pavlit.provers": {"demo": "pavlit_demo_prover:DemoProver"}},
}


@pytest.fixture
def third_party_site(tmp_path: Path) -> Path:
    """A folder where a tiny third-party plugin package is installed, as pip would, minus pip.

    The package ``pavlit-demo-prover`` declares ``demo = "pavlit_demo_prover:DemoProver"`` in the
    ``pavlit.provers`` group of its pyproject.toml; its ``*.dist-info`` (METADATA + entry_points.txt) is what
    importlib.metadata discovers once the folder is on ``sys.path`` / ``PYTHONPATH``. Returns the folder.
    """
    dist, version, package = DEMO_PLUGIN["distribution"], DEMO_PLUGIN["version"], DEMO_PLUGIN["package"]
    groups = DEMO_PLUGIN["entry_points"]
    source = tmp_path / "src" / dist
    (source / package).mkdir(parents=True)
    module = '''\
        """A third-party prover: the base policy itself (Q^mu = Q^pi)."""

        from pavlit.interfaces import Prover


        class DemoProver(Prover):
            def q_values(self, q_pi, prefixes=None):
                return q_pi.clone()
        '''
    (source / package / "__init__.py").write_text(textwrap.dedent(module))
    pyproject = [f'[project]\nname = "{dist}"\nversion = "{version}"\ndependencies = ["pavlit"]\n']
    entry_points_txt = []
    for group, entries in groups.items():
        lines = "".join(f'{name} = "{target}"\n' for name, target in entries.items())
        pyproject.append(f'\n[project.entry-points."{group}"]\n{lines}')
        entry_points_txt.append(f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in entries.items()))
    (source / "pyproject.toml").write_text("".join(pyproject))

    site = tmp_path / "site"
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text((source / package / "__init__.py").read_text())
    dist_info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (dist_info / "entry_points.txt").write_text("\n".join(entry_points_txt))
    return site
