"""Safety: no unpickling of untrusted files, no remote code unless asked, no pickle in pavlit's own formats, and a
run writes only inside its run folder.

(That ``PAVLIT_DISABLE_PLUGIN_AUTOLOAD=1`` keeps plugin autoloading to pavlit's built-ins is tested in
``tests/test_registry.py``: ``test_off_switch_keeps_autoload_to_builtins`` and ``test_off_switch_reaches_the_cli``.)
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

REPO = Path(__file__).parents[1]
PACKAGE = REPO / "pavlit"
SOURCES = sorted(PACKAGE.rglob("*.py"))
TINY = {"n_layer": 1, "n_embd": 16, "n_head": 2}


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    """Calls of ``name`` (``torch.load`` / ``from_pretrained`` ...) however the callee is spelled at the end."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            dotted = []
            while isinstance(func, ast.Attribute):
                dotted.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                dotted.append(func.id)
            if ".".join(reversed(dotted)).endswith(name):
                found.append(node)
    return found


def _parsed() -> list[tuple[Path, ast.AST]]:
    return [(path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))) for path in SOURCES]


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


# --- torch.load only with weights_only=True --------------------------------------------------------------------


def test_every_torch_load_in_pavlit_passes_weights_only_true():
    loads = [(path, call) for path, tree in _parsed() for call in _calls(tree, "torch.load")]
    assert loads, "the scan should see pavlit's torch.load calls (verifier.restore_best_checkpoint)"
    unsafe = [
        _where(path, call)
        for path, call in loads
        if not any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in call.keywords
        )
    ]
    assert not unsafe, f"torch.load without weights_only=True at {unsafe}"


class _RunsCodeWhenUnpickled:
    """What a malicious checkpoint holds: unpickling it calls ``Path.touch`` on a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_holding_code_is_refused_not_run(tmp_path):
    from pavlit.modules.verifier_fit import restore_best_checkpoint

    marker = tmp_path / "code_ran"
    checkpoint = tmp_path / "best.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCodeWhenUnpickled(marker)}, checkpoint)
    callback = SimpleNamespace(best_model_path=str(checkpoint), monitor="val/bce", best_model_score=None)
    module = torch.nn.Linear(2, 1)
    module.trainer = SimpleNamespace(checkpoint_callback=callback)
    with pytest.raises(ValueError, match=r"best\.ckpt: refused: the checkpoint holds pickled Python objects"):
        restore_best_checkpoint(module)
    assert not marker.exists(), "unpickling ran the checkpoint's code"


# --- --ckpt_path: a local file, loaded weights-only, that never changes the configured model ---------------------

FIT_YAML = """\
model:
  class_path: pavlit.modules.pav.PAVModule
  init_args:
    source: {{class_path: pavlit.policy.sources.TinyPolicy, init_args: {{n_layer: 1, n_embd: 16, n_head: 2}}}}
    lr: 0.01
    warmup_steps: 0
data:
  class_path: pavlit.data.step_labels.StepLabelDataModule
  init_args: {{path: {labels}, batch_size: 4, val_fraction: 0.25}}
trainer:
  default_root_dir: {root}
  accelerator: cpu
  devices: 1
  max_steps: 4
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
resume:
  every_n_train_steps: 2
"""


@pytest.fixture
def fit_config(tmp_path, monkeypatch) -> Path:
    from test_step_labels import synthetic_labels, write_jsonl

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pavlit"])
    labels = write_jsonl(tmp_path / "labels" / "chunk-000000.jsonl", synthetic_labels(6, 2)).parent
    config = tmp_path / "fit.yaml"
    config.write_text(FIT_YAML.format(labels=labels, root=tmp_path / "run"))
    return config


class _Server:
    """A local HTTP server that serves ``body`` at every path and records every request it receives."""

    def __init__(self, body: bytes = b"") -> None:
        import http.server
        import threading

        requests: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                requests.append(f"{self.command} {self.path}")
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _answer

            def log_message(self, *args) -> None:
                pass

        self.requests = requests
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_a_url_ckpt_path_is_refused_in_one_line_and_never_fetched(fit_config, tmp_path, monkeypatch, capsys):
    from pavlit.cli import main

    marker = tmp_path / "code_ran"
    payload = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCodeWhenUnpickled(marker)}, payload)
    server = _Server(payload.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    try:
        for url in (f"{server.url}/evil.ckpt", "s3://bucket/evil.ckpt", "registry:acme/model:latest"):
            assert main(["fit", "--config", str(fit_config), "--ckpt_path", url]) == 1
            error, hint = _stderr_lines(capsys)
            assert error.startswith("pavlit fit: error:") and repr(url) in error and "local files only" in error
            assert "PAVLIT_TRACEBACK" in hint
    finally:
        server.close()
    assert server.requests == [] and not marker.exists()
    assert not (tmp_path / "torch_home").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["pickled code", "garbage", "truncated", "empty", "missing"])
def test_a_bad_ckpt_path_is_one_line_naming_the_file(fit_config, tmp_path, capsys, kind):
    from pavlit.cli import main

    marker, checkpoint = tmp_path / "code_ran", tmp_path / "given.ckpt"
    if kind == "pickled code":
        torch.save({"state_dict": {}, "payload": _RunsCodeWhenUnpickled(marker)}, checkpoint)
    elif kind == "garbage":
        checkpoint.write_bytes(b"this is not a checkpoint\n" * 20)
    elif kind in ("truncated", "empty"):
        torch.save({"state_dict": {"w": torch.zeros(256)}}, checkpoint)
        data = checkpoint.read_bytes()
        checkpoint.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"")
    assert main(["fit", "--config", str(fit_config), "--ckpt_path", str(checkpoint)]) == 1
    lines = _stderr_lines(capsys)
    assert len(lines) == 2 and str(checkpoint) in lines[0] and "--ckpt_path" in lines[0], lines
    expected = {"pickled code": "refused: the checkpoint holds pickled Python objects", "missing": "no such"}
    assert expected.get(kind, "checkpoint") in lines[0]
    assert not marker.exists()


def _no_run_cli(args: list[str]):
    from pavlit.cli import PavlitCLI

    class ParseOnly(PavlitCLI):
        def _run_subcommand(self, subcommand: str) -> None:
            pass

    return ParseOnly(args=args)


def test_checkpoint_hyper_parameters_never_override_the_config(fit_config, tmp_path):
    from pavlit.callbacks import LocalCheckpointIO
    from pavlit.modules.pav import PAVModule
    from pavlit.policy.sources import TinyPolicy

    # Weights-only safe, but its hyper_parameters ask for another class, another source with remote code, and
    # another learning rate: LightningCLI merges these over the user's model config.
    checkpoint = tmp_path / "hparams.ckpt"
    hyper_parameters = {
        "_class_path": "pavlit.modules.orm.ORMModule",
        "source": {"class_path": "pavlit.policy.sources.Pretrained",
                   "init_args": {"path": str(tmp_path / "elsewhere"), "trust_remote_code": True}},
        "lr": 0.5,
    }  # fmt: skip
    torch.save({"state_dict": {}, "hyper_parameters": hyper_parameters}, checkpoint)
    cli = _no_run_cli(["fit", "--config", str(fit_config), "--ckpt_path", str(checkpoint)])
    assert type(cli.model) is PAVModule and cli.model.hparams.lr == 0.01
    assert cli.model.hparams.source["class_path"].endswith("TinyPolicy")
    assert isinstance(cli.config_init["fit"]["model"].hparams.get("source"), dict)
    assert TinyPolicy.__name__ in cli.model.hparams.source["class_path"]
    # Lightning's own load of the checkpoint is weights-only, through pavlit's checkpoint I/O.
    assert cli._prepare_subcommand_kwargs("fit")["weights_only"] is True
    assert isinstance(cli.trainer.strategy.checkpoint_io, LocalCheckpointIO)


def test_weights_only_false_is_refused(fit_config, tmp_path, capsys):
    from pavlit.cli import main

    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    args = ["fit", "--config", str(fit_config), "--ckpt_path", str(tmp_path / "plain.ckpt"), "--weights_only", "false"]
    assert main(args) == 1
    assert "--weights_only false is not supported" in _stderr_lines(capsys)[0]


def _record_renames(monkeypatch) -> list[tuple[Path, Path]]:
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def replace(src, dst) -> None:
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return renames


def test_checkpoint_io_loads_weights_only_and_saves_in_place(tmp_path, monkeypatch):
    import errno
    import tempfile

    from pavlit.callbacks import LocalCheckpointIO

    io = LocalCheckpointIO()
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"payload": _RunsCodeWhenUnpickled(marker)}, evil)
    with pytest.raises(ValueError, match="refused"):
        io.load_checkpoint(evil)
    with pytest.raises(ValueError, match="weights_only=True only"):
        io.load_checkpoint(evil, weights_only=False)
    with pytest.raises(ValueError, match="not a local file"):
        io.load_checkpoint("https://example.com/x.ckpt")
    assert not marker.exists()

    # Saves go to a temporary file beside the target, fsynced, renamed over it; the system temp folder is unused.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "system_tmp"))
    renames, synced = [], []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(
        os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))), real_replace(src, dst))
    )
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 7}, target)
    assert [(src.parent, dst) for src, dst in renames] == [(target.parent, target)] and len(synced) >= 2
    assert io.load_checkpoint(target)["global_step"] == 7
    assert not (tmp_path / "system_tmp").exists()

    # A full disk mid-write leaves the previous checkpoint whole and no temporary file; the error names the file.
    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left") as err:
        io.save_checkpoint({"global_step": 8}, target)
    assert err.value.filename == str(target)
    assert io.load_checkpoint(target)["global_step"] == 7
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_a_corrupt_resume_checkpoint_is_set_aside_not_resumed(fit_config, tmp_path):
    from pavlit.callbacks import atomic_save_checkpoint
    from pavlit.cli import RESUME_CHECKPOINT, RESUME_SETTINGS, resume_settings

    cli = _no_run_cli(["fit", "--config", str(fit_config)])
    resume, record = tmp_path / "run" / RESUME_CHECKPOINT, tmp_path / "run" / RESUME_SETTINGS
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"settings": resume_settings(cli.config["fit"])}))
    atomic_save_checkpoint({"state_dict": {"w": torch.zeros(512)}, "global_step": 2}, resume)
    whole = resume.read_bytes()

    resume.write_bytes(whole[: len(whole) - 100])  # what a copy cut short by a full disk or a kill leaves
    with pytest.warns(UserWarning, match=r"resume\.ckpt.*moved it aside to resume\.ckpt\.corrupt"):
        cli.before_fit()
    assert cli.config_init["fit"].ckpt_path is None
    assert not resume.exists() and (resume.parent / "resume.ckpt.corrupt").read_bytes() == whole[:-100]

    resume.write_bytes(whole)  # an intact one is resumed from
    cli.before_fit()
    assert cli.config_init["fit"].ckpt_path == str(resume)


def test_the_resume_checkpoint_is_renamed_into_place_never_copied(fit_config, tmp_path, monkeypatch):
    import shutil

    from pavlit.cli import main

    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))), real_replace(src, dst))
    )
    copies: list[str] = []
    monkeypatch.setattr(shutil, "move", lambda src, dst, *a, **k: copies.append(str(dst)))
    assert main(["fit", "--config", str(fit_config)]) == 0
    into_resume = [(src, dst) for src, dst in renames if dst.name == "resume.ckpt"]
    assert len(into_resume) == 2  # every_n_train_steps 2 of max_steps 4
    assert all(src.parent == dst.parent and src.name.startswith(".resume.ckpt.") for src, dst in into_resume)
    assert copies == []


# --- model sources come from the user, never from an exported file ---------------------------------------------


@pytest.fixture(scope="module")
def adapter_export(tmp_path_factory) -> Path:
    from pavlit.models.adapters import LoRAArgs
    from pavlit.modules.pav import PAVModule
    from pavlit.policy.sources import TinyPolicy

    folder = tmp_path_factory.mktemp("export") / "verifier"
    PAVModule(source=TinyPolicy(**TINY), lora=LoRAArgs(enabled=True, r=2)).save_pretrained(folder)
    return folder


def _edited_copy(export: Path, tmp_path: Path, source: dict) -> Path:
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(export, folder)
    meta = json.loads((folder / "pavlit_verifier.json").read_text())
    assert meta["backbone"] == "adapter"
    meta["source"] = source
    (folder / "pavlit_verifier.json").write_text(json.dumps(meta))
    return folder


def test_an_exported_verifier_cannot_turn_on_remote_code(adapter_export, tmp_path):
    from pavlit.modules.pav import PAVModule
    from pavlit.policy.sources import TinyPolicy

    source = {"class_path": "pavlit.policy.sources.Pretrained",
              "init_args": {"path": str(tmp_path / "custom_code_model"), "trust_remote_code": True}}  # fmt: skip
    folder = _edited_copy(adapter_export, tmp_path, source)
    with pytest.raises(ValueError, match=r"pavlit_verifier\.json: the model source asks for trust_remote_code"):
        PAVModule.from_pretrained(folder)
    # The user may still choose the base model (and its remote code) themselves.
    reloaded = PAVModule.from_pretrained(folder, source=TinyPolicy(**TINY))
    assert reloaded.score_prefixes(["1+1="], [["2"]])[0].shape == (2,)


def test_an_exported_verifier_cannot_make_pavlit_import_a_module(adapter_export, tmp_path, monkeypatch):
    from pavlit.modules.pav import PAVModule

    marker = tmp_path / "imported"
    (tmp_path / "pavlit_probe_planted.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for class_path in ("pavlit_probe_planted.Source", "os.system", "pavlit.policy.sources.ModelSource"):
        folder = _edited_copy(adapter_export, tmp_path / class_path, {"class_path": class_path, "init_args": {}})
        with pytest.raises(ValueError, match="is not one of pavlit's model sources"):
            PAVModule.from_pretrained(folder)
    assert not marker.exists() and "pavlit_probe_planted" not in sys.modules


def test_a_source_read_back_from_checkpoint_hyper_parameters_cannot_turn_on_remote_code():
    from pavlit.models.backbone import as_model_source

    hparams_source = {
        "class_path": "pavlit.policy.sources.Pretrained",
        "init_args": {"path": "m", "trust_remote_code": True},
    }
    with pytest.raises(ValueError, match="trust_remote_code"):
        as_model_source(hparams_source)
    assert as_model_source({"class_path": "Pretrained", "init_args": {"path": "m"}}).trust_remote_code is False


# --- dataset names never reach the Hugging Face Hub -------------------------------------------------------------


def test_main_sets_the_hub_offline_unless_the_environment_says_otherwise(monkeypatch):
    from pavlit.cli import main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    assert main(["plugins", "--kind", "tasks"]) == 0
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "0"


@pytest.mark.slow  # a subprocess (the Hub settings are read when huggingface_hub is imported): ~10-25 s
def test_a_hub_shaped_data_path_errors_at_once_and_contacts_nothing(fit_config, tmp_path):
    server = _Server()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PAVLIT_"))}
    env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pavlit", "fit", "--config", str(fit_config), "--data.init_args.path", "org/name"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        server.close()
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("pavlit fit: error:")]
    assert len(errors) == 1 and "'org/name'" in errors[0] and "Traceback" not in done.stderr
    assert server.requests == []


# --- trust_remote_code is off unless a config turns it on ------------------------------------------------------


def test_trust_remote_code_defaults_to_false_and_is_never_hard_coded_true():
    defaults, hard_coded = [], []
    for path, tree in _parsed():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                positional = args.posonlyargs + args.args
                pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
                pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
                pairs += [(a, None) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None]
                for arg, default in pairs:
                    if arg.arg == "trust_remote_code":
                        defaults.append(_where(path, node))
                        if not (isinstance(default, ast.Constant) and default.value is False):
                            shown = ast.unparse(default) if default else "-"
                            hard_coded.append(f"{_where(path, node)} default {shown}")
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "trust_remote_code" and isinstance(keyword.value, ast.Constant):
                        if keyword.value.value is not False:
                            hard_coded.append(f"{_where(path, node)} passes {keyword.value.value!r}")
    assert defaults, "the scan should see load_policy's and Pretrained's trust_remote_code"
    assert not hard_coded, hard_coded

    from pavlit.policy.loading import load_policy
    from pavlit.policy.sources import Pretrained

    assert inspect.signature(load_policy).parameters["trust_remote_code"].default is False
    assert inspect.signature(Pretrained).parameters["trust_remote_code"].default is False
    assert Pretrained(path="x").trust_remote_code is False


# pavlit's own loaders of exported verifier folders (they read them through load_policy / safetensors), and peft's
# adapter loader (its folder was checked to exist; it takes no local_files_only).
OWN_LOADERS = ("PAVModule", "ORMModule", "Verifier", "PeftModel")
# Calls known to lack local_files_only=True, with why they are listed; the test fails once one is fixed, so that
# the list shrinks with the code.
KNOWN_GAPS: dict[str, str] = {}


def test_every_from_pretrained_call_stays_local():
    """Each Hugging Face ``from_pretrained`` in pavlit reads local files only (no download, so no remote code)."""
    remote = []
    for path, tree in _parsed():
        for call in _calls(tree, "from_pretrained"):
            receiver = ast.unparse(call.func).removesuffix(".from_pretrained")
            keywords = {k.arg: k.value for k in call.keywords}
            local = keywords.get("local_files_only")
            if receiver not in OWN_LOADERS and not (isinstance(local, ast.Constant) and local.value is True):
                remote.append(str(path.relative_to(REPO)))
    assert sorted(set(remote)) == sorted(KNOWN_GAPS), f"from_pretrained without local_files_only=True in {remote}"


def test_no_shipped_config_turns_remote_code_on():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        assert "trust_remote_code: true" not in path.read_text().lower(), path


# --- no pickle in pavlit's own formats --------------------------------------------------------------------------


# Lightning's checkpoints (.ckpt, for resuming) are torch.save's zip files by Lightning's design; pavlit writes them
# through this one function and reads them back with weights_only=True. Nothing else in pavlit uses torch.save.
TORCH_SAVE_ALLOWED = {"pavlit/callbacks.py": "atomic_save_checkpoint: Lightning's checkpoint format"}


def test_pavlit_never_imports_a_pickler_or_calls_torch_save():
    offenders = []
    for path, tree in _parsed():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{_where(path, node)} imports {n}" for n in names if n.split(".")[0] in
                          ("pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve", "marshal")]  # fmt: skip
        saves = _calls(tree, "torch.save")
        if str(path.relative_to(REPO)) in TORCH_SAVE_ALLOWED:
            assert len(saves) == 1, f"{path}: expected only atomic_save_checkpoint's torch.save"
            continue
        offenders += [f"{_where(path, call)} calls torch.save" for call in saves]
    assert not offenders, offenders


def _is_pickle_or_torch_zip(path: Path) -> bool:
    head = path.read_bytes()[:4]
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return True
    if zipfile.is_zipfile(path):
        return any(name.endswith("data.pkl") for name in zipfile.ZipFile(path).namelist())
    return False


def test_exported_verifier_is_safetensors_and_json_only(tmp_path):
    from pavlit.modules.pav import PAVModule
    from pavlit.policy.sources import TinyPolicy

    folder = PAVModule(source=TinyPolicy(**TINY)).save_pretrained(tmp_path / "verifier")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert {p.suffix for p in files} <= {".json", ".safetensors", ".txt", ".jinja"}, [p.name for p in files]
    assert {"value_head.safetensors", "model.safetensors", "pavlit_verifier.json"} <= {p.name for p in files}
    assert not [p.name for p in files if _is_pickle_or_torch_zip(p)]
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())


# --- a run writes only inside its run folder --------------------------------------------------------------------

RUN_SCRIPT = """
import sys
from pavlit.cli import main
status = main(["label", "--config", "label.yaml"]) or main(["fit", "--config", "fit.yaml"])
sys.exit(status)
"""


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_label_then_fit_write_only_into_their_run_folders(tmp_path):
    """A tiny ``pavlit label`` and ``pavlit fit`` (PAV on those labels) from an empty working directory, with
    ``HOME``, the caches and ``TMPDIR`` redirected to empty folders: afterwards the working directory holds the two
    input configs and ``runs/`` only, and the home, Hugging Face, torch and temp folders are still empty."""
    work, home = tmp_path / "work", tmp_path / "home"
    elsewhere = {name: tmp_path / name for name in ("cache", "hf", "tmp", "torch")}
    for folder in [work, home, *elsewhere.values()]:
        folder.mkdir()
    policy = {"class_path": "TinyPolicy", "init_args": TINY}
    label = {
        "task": {"class_path": "ArithmeticTask", "init_args": {"n_train": 3, "n_validation": 1, "n_test": 1}},
        "policy": policy,
        "output_dir": "runs/labels",
        "label": {"n_cov": 2, "n_mc": 2, "max_new_tokens": 24},
        "chunk_size": 2,
    }
    fit = {
        "model": {"class_path": "pavlit.modules.pav.PAVModule", "init_args": {"source": policy}},
        "data": {"class_path": "pavlit.data.step_labels.StepLabelDataModule",
                 "init_args": {"path": "runs/labels", "batch_size": 2, "val_fraction": 0.3}},
        "trainer": {"max_steps": 2, "limit_val_batches": 1, "default_root_dir": "runs/pav",
                    "enable_progress_bar": False},
    }  # fmt: skip
    (work / "label.yaml").write_text(yaml.safe_dump(label))
    (work / "fit.yaml").write_text(yaml.safe_dump(fit))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PAVLIT_", "HF_", "XDG_", "TRANSFORMERS_", "MPL"))},
        "HOME": str(home),
        "XDG_CACHE_HOME": str(elsewhere["cache"]),
        "HF_HOME": str(elsewhere["hf"]),
        "TMPDIR": str(elsewhere["tmp"]),
        "TORCH_HOME": str(elsewhere["torch"]),
        "PYTHONPATH": str(REPO),
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run([sys.executable, "-c", RUN_SCRIPT], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    assert sorted(p.name for p in work.iterdir()) == ["fit.yaml", "label.yaml", "runs"]
    assert sorted(p.name for p in (work / "runs").iterdir()) == ["labels", "pav"]
    written = _tree(work / "runs")
    assert "labels/metrics.json" in written and "pav/verifier/pavlit_verifier.json" in written
    assert "labels/config.yaml" in written and "pav/lightning_logs/version_0/config.yaml" in written
    # Written elsewhere, in the user's cache folder, are only caches, not run data: matplotlib's font cache
    # (torchmetrics imports matplotlib when installed) and the sampler's native decode step, compiled once per
    # machine by torch.utils.cpp_extension into its extension folder (pavlit/policy/native.py).
    cached = _tree(elsewhere["cache"])
    fonts = [f for f in cached if f.startswith("matplotlib/fontlist-")]
    native_build = [f for f in cached if f.startswith("torch_extensions/") and "/pavlit_native_decode_" in f]
    assert sorted(fonts + native_build) == cached and len(fonts) <= 1
    for folder in [home, elsewhere["hf"], elsewhere["tmp"], elsewhere["torch"]]:
        assert _tree(folder) == [], f"{folder.name} got {_tree(folder)}"
