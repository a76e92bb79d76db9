"""What one user feels under no load: TTFT and time per output token of a single stream.

    .venv/bin/python benchmarks/single_stream.py --model smollm2 --dtype float32
    .venv/bin/python benchmarks/single_stream.py --url http://127.0.0.1:8000   # e.g. vLLM's

Without --url it starts `fleetserve serve MODEL` (fleetserve.testing.launcher), with --url it
measures a server that is already running (any OpenAI-compatible one). Either way it sends one
streaming /v1/completions request at a time: --input-len random token ids, --output-len tokens,
greedy, EOS ignored; --warmup requests first, then --requests measured ones. TTFT is the time
to the first streamed token, TPOT the mean gap between the following ones, per request; the
medians (p50) and the spread are printed, with the CPU's flags.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import httpx
from throughput import OUT, smollm2_path

from fleetserve.cpu import cpu_flags

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def notable_flags() -> str:
    flags = cpu_flags()
    if not flags:
        return "unknown"
    have = set(flags.split())
    return " ".join(f for f in FLAGS if f in have) or "none of " + ",".join(FLAGS)


def one_request(client: httpx.Client, url: str, model: str, prompt: list[int], n: int):
    """(TTFT s, TPOT s, tokens) of one streamed completion."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.perf_counter()
    arrivals = []
    with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                arrivals.append(time.perf_counter())
    if len(arrivals) < 2:
        raise RuntimeError(f"the server streamed {len(arrivals)} chunks; expected {n}")
    ttft = arrivals[0] - start
    tpot = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)
    return ttft, tpot, len(arrivals)


def measure(url: str, args) -> dict:
    with httpx.Client(timeout=600.0) as client:
        model = client.get(url + "/v1/models").json()["data"][0]["id"]
        rng = random.Random(0)
        ttfts, tpots = [], []
        for i in range(args.warmup + args.requests):
            prompt = [rng.randrange(100, 40000) for _ in range(args.input_len)]
            ttft, tpot, chunks = one_request(client, url, model, prompt, args.output_len)
            if i >= args.warmup:
                ttfts.append(ttft)
                tpots.append(tpot)
                print(
                    f"  request {i - args.warmup + 1}: TTFT {ttft * 1e3:.1f} ms, "
                    f"TPOT {tpot * 1e3:.1f} ms over {chunks} chunks",
                    flush=True,
                )
    return {"model": model, "ttft": ttfts, "tpot": tpots}


def summary(values: list[float]) -> str:
    ms = [v * 1e3 for v in values]
    return f"{statistics.median(ms):.1f} ms (min {min(ms):.1f}, max {max(ms):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="measure this running server instead of starting one")
    parser.add_argument("--model", default="smollm2", help="smollm2, or a path to serve")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--serve-arg", action="append", default=[], help="extra serve flags")
    args = parser.parse_args()

    replica = None
    url = args.url
    if url is None:
        from fleetserve.testing.launcher import ReplicaProcess

        if args.model == "smollm2":  # as an HF folder, the form every engine can read
            from gguf_to_hf import convert

            model = str(convert(Path(smollm2_path()), OUT / "smollm2-hf"))
        else:
            model = args.model
        replica = ReplicaProcess(model, "--dtype", args.dtype, *args.serve_arg)
        replica.wait_ready(timeout=600)
        url = replica.url
    try:
        result = measure(url, args)
    finally:
        if replica is not None:
            replica.stop()
    what = url if args.url else f"fleetserve serve ({args.dtype})"
    print(
        f"\n{what}, model {result['model']}: 1 stream, {args.input_len} in / "
        f"{args.output_len} out, greedy, {args.requests} requests; CPU flags: {notable_flags()}"
    )
    print(f"TPOT p50 {summary(result['tpot'])}")
    print(f"TTFT p50 {summary(result['ttft'])}")


if __name__ == "__main__":
    main()
