"""GPU measurements for `gpu_check.sh` (a CUDA machine; every figure a median).

    python benchmarks/gpu_bench.py kernel --out kernel.json   # Triton vs torch attention
    python benchmarks/gpu_bench.py engine --out engine.json   # decode tok/s, graphs on/off
    python benchmarks/gpu_bench.py summary DIR                # the table of both, last

kernel: one layer's attention (write K/V + attend) for decode batches and one prefill chunk
over a cached prefix, random-100m's heads (12 query, 4 KV, head_dim 64), bf16 cache, block 16,
`triton.testing.do_bench` medians (ms), and the K/V bytes read over that time (GB/s).

engine: a random ~100M Llama (hidden 768, 12 layers, 12/4 heads, intermediate 2048, vocab
49152, tied, bf16; random-100m of throughput.py, built here from its config, no tokenizer:
the engine core takes token ids) driven through `EngineCore.step()`: N requests x 128 random
tokens in, 128 out, greedy, ignore_eos; output tok/s over the whole run (prefill included,
as throughput.py counts), the median decode-only step (ms), and batch 1's TPOT.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 12, 4, 64, 16


def kernel_bench(out: Path) -> None:
    import triton

    from fleetserve.attention import SeqSpec, build_attention_metadata, get_backend

    torch.backends.cuda.matmul.allow_tf32 = False
    dev, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    cases = [("decode", b, ctx) for b in (1, 64, 256) for ctx in (512, 2048)]
    cases += [("prefill 512 after 1536", 1, 2048), ("prefill 2048", 1, 2048)]
    backends = {name: get_backend(name) for name in ("torch", "triton")}
    for kind, batch, ctx in cases:
        blocks_per_seq = -(-ctx // BLOCK)
        num_blocks = 1 + batch * blocks_per_seq
        perm = torch.randperm(num_blocks - 1)[: batch * blocks_per_seq] + 1
        tables = perm.view(batch, blocks_per_seq).tolist()
        if kind == "decode":
            specs = [SeqSpec(ctx - 1, 1, t) for t in tables]
        elif kind.startswith("prefill 512"):
            specs = [SeqSpec(ctx - 512, 512, t) for t in tables]
        else:
            specs = [SeqSpec(0, ctx, t) for t in tables]
        meta = build_attention_metadata(specs, BLOCK, dev)
        n = meta.query_start_loc[-1]
        q = torch.randn(n, HEADS, HEAD_DIM, device=dev, dtype=dtype)
        k = torch.randn(n, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
        v = torch.randn(n, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
        cache = torch.randn(2, KV_HEADS, num_blocks, BLOCK, HEAD_DIM, device=dev, dtype=dtype)
        ref = backends["torch"].forward(q, k, v, cache, meta, HEAD_DIM**-0.5).float()
        got = backends["triton"].forward(q, k, v, cache, meta, HEAD_DIM**-0.5).float()
        rel = ((got - ref).norm() / ref.norm()).item()
        kv_bytes = sum(meta.seq_lens) * KV_HEADS * HEAD_DIM * 2 * cache.element_size()
        row = {"case": kind, "batch": batch, "ctx": ctx, "rel_err_vs_torch": rel}
        for name, backend in backends.items():
            ms = triton.testing.do_bench(
                lambda b=backend, a=(q, k, v, cache, meta): b.forward(*a, HEAD_DIM**-0.5),
                warmup=25,
                rep=100,
                return_mode="median",
            )
            row[f"{name}_ms"] = ms
            row[f"{name}_GBps"] = kv_bytes / ms / 1e6
        row["speedup"] = row["torch_ms"] / row["triton_ms"]
        print(json.dumps(row), flush=True)
        rows.append(row)
        out.write_text(json.dumps(rows, indent=1))  # after each row: a timeout keeps them


def _case(kind: str, batch: int, ctx: int, q_len: int, dtype=torch.bfloat16):
    """Random inputs of one layer's attention step: `batch` sequences with `ctx` tokens after
    the step, `q_len` of them new (1: decode)."""
    from fleetserve.attention import SeqSpec, build_attention_metadata

    dev = torch.device("cuda")
    blocks_per_seq = -(-ctx // BLOCK)
    num_blocks = 1 + batch * blocks_per_seq
    perm = torch.randperm(num_blocks - 1)[: batch * blocks_per_seq] + 1
    tables = perm.view(batch, blocks_per_seq).tolist()
    specs = [SeqSpec(ctx - q_len, q_len, t) for t in tables]
    meta = build_attention_metadata(specs, BLOCK, dev)
    n = meta.query_start_loc[-1]
    q = torch.randn(n, HEADS, HEAD_DIM, device=dev, dtype=dtype)
    k = torch.randn(n, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
    v = torch.randn(n, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
    cache = torch.randn(2, KV_HEADS, num_blocks, BLOCK, HEAD_DIM, device=dev, dtype=dtype)
    return meta, q, k, v, cache


TUNE_CASES = [
    ("decode", 1, 2048, 1),
    ("decode", 64, 512, 1),
    ("decode", 256, 512, 1),
    ("decode", 256, 2048, 1),
    ("prefill", 1, 2048, 2048),
    ("prefill", 16, 128, 128),
    ("prefill", 1, 2048, 512),
]


def tune(out: Path) -> None:
    """Every launch shape on every case: correct (rel err vs the torch reference < 2e-2) and
    timed; the best by the geometric mean of its time over the best time of each case."""
    import functools
    import itertools
    import math

    import triton

    from fleetserve.attention import get_backend, triton_kernels

    ref_backend = get_backend("torch")
    spaces = {
        "decode": [
            {"block_n": n, "num_warps": w, "num_stages": st}
            for n, w, st in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4))
        ],
        "prefill": [
            {"block_q": bq, "block_n": n, "num_warps": w, "num_stages": st}
            for bq, n, w, st in itertools.product((16, 32), (32, 64, 128), (4, 8), (2, 3))
        ],
    }
    results = {"decode": {}, "prefill": {}}
    for kind, batch, ctx, q_len in TUNE_CASES:
        meta, q, k, v, cache = _case(kind, batch, ctx, q_len)
        scale = HEAD_DIM**-0.5
        ref = ref_backend.forward(q, k, v, cache, meta, scale).float()
        nd = meta.num_decodes
        qsl = torch.tensor(meta.query_start_loc, device=q.device)
        for cfg in spaces[kind]:
            out_t = torch.full_like(q, float("nan"))

            call = functools.partial(
                triton_kernels.paged_attention,
                out_t,
                q,
                cache,
                meta.block_tables,
                meta.seq_lens_tensor,
                None if kind == "decode" else qsl,
                scale,
                first_seq=0,
                num_seqs=batch,
                max_query_len=q_len,
                decode=kind == "decode",
                tuning=cfg,
            )

            try:
                call()
                rel = ((out_t.float() - ref).norm() / ref.norm()).item()
                ms = triton.testing.do_bench(call, warmup=10, rep=40, return_mode="median")
            except Exception as e:  # a shape that does not compile (registers, shared memory)
                rel, ms = float("nan"), float("inf")
                print(f"  {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            if not rel < 2e-2:
                ms = float("inf")
            key = json.dumps(cfg, sort_keys=True)
            results[kind].setdefault(key, {})[f"{batch}x{ctx}q{q_len}"] = ms
        assert nd == (batch if kind == "decode" else 0)
        best = min(results[kind].items(), key=lambda kv: kv[1][f"{batch}x{ctx}q{q_len}"])
        print(
            f"{kind} {batch}x{ctx} q{q_len}: best {best[0]} "
            f"{best[1][f'{batch}x{ctx}q{q_len}']:.4f} ms",
            flush=True,
        )
    chosen = {}
    for kind, by_cfg in results.items():
        cases = list(next(iter(by_cfg.values())))
        floor = {c: min(r[c] for r in by_cfg.values()) for c in cases}

        def score(r, cases=cases, floor=floor):
            return math.exp(sum(math.log(r[c] / floor[c]) for c in cases) / len(cases))

        ranked = sorted(by_cfg.items(), key=lambda kv: score(kv[1]))
        default = json.dumps(
            triton_kernels.DECODE_TUNING if kind == "decode" else triton_kernels.PREFILL_TUNING,
            sort_keys=True,
        )
        chosen[kind] = {
            "best": json.loads(ranked[0][0]),
            "best_ms": ranked[0][1],
            "best_score": score(ranked[0][1]),
            "default": json.loads(default),
            "default_ms": by_cfg.get(default),
            "default_score": score(by_cfg[default]) if default in by_cfg else None,
            "floor_ms": floor,
            "top5": [(json.loads(c), round(score(r), 3)) for c, r in ranked[:5]],
        }
        print(kind, json.dumps(chosen[kind]), flush=True)
    out.write_text(json.dumps(chosen, indent=1))


def apply_tuning(path: Path | None) -> None:
    """Benchmarks only: run with the launch shapes `tune` chose (its JSON)."""
    if path is None or not path.exists():
        return
    from fleetserve.attention import triton_kernels

    chosen = json.loads(path.read_text())
    triton_kernels.DECODE_TUNING.update(chosen["decode"]["best"])
    triton_kernels.PREFILL_TUNING.update(chosen["prefill"]["best"])
    print(f"tuning from {path}: {triton_kernels.DECODE_TUNING} {triton_kernels.PREFILL_TUNING}")


def build_random_100m(folder: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=2048,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return str(folder)


def run_engine(
    model: str, backend: str, eager: bool, num: int, in_len: int, out_len: int, device: str
):
    from fleetserve.engine.config import EngineConfig
    from fleetserve.engine.core import build_engine_core
    from fleetserve.engine.request import EngineCoreRequest
    from fleetserve.engine.sampling_params import SamplingParams

    t0 = time.perf_counter()
    core = build_engine_core(
        EngineConfig(
            model=model,
            device=device,
            attention_backend=backend,
            enforce_eager=eager,
            max_model_len=1024,
            max_num_seqs=256,
        ),
        progress=False,
    )
    start_s = time.perf_counter() - t0
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)

    def go(n: int, tag: str) -> tuple[float, int, list[float]]:
        for i in range(n):
            ids = [rng.randrange(100, 49000) for _ in range(in_len)]
            core.add_request(EngineCoreRequest(f"{tag}{i}", ids, params))
        tokens, decode_steps = 0, []
        begin = time.perf_counter()
        while core.has_unfinished():
            prompt_before = core.prompt_tokens_total
            s = time.perf_counter()
            outs = core.step()
            dt = time.perf_counter() - s  # step() returns sampled ids: synchronized
            tokens += sum(len(o.new_token_ids) for o in outs)
            failed = [o.error for o in outs if o.error]
            if failed:
                raise RuntimeError(f"a request failed: {failed[0]}")
            if core.prompt_tokens_total == prompt_before:
                decode_steps.append(dt)
        return time.perf_counter() - begin, tokens, decode_steps

    go(min(num, 4), "warm")  # compiles the kernels of this shape family
    elapsed, tokens, steps = go(num, "run")
    return {
        "backend": backend,
        "graphs": not eager,
        "num_seqs": num,
        "out_tok_s": tokens / elapsed,
        "elapsed_s": elapsed,
        "decode_step_ms_p50": 1e3 * statistics.median(steps) if steps else None,
        "start_s": start_s,
    }


def engine_bench(out: Path, args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_random_100m(Path(tmp) / "random-100m")
        for backend, eager in (("triton", False), ("triton", True), ("torch", True)):
            for num in (int(n) for n in args.sizes.split(",")):
                runs = []
                for _ in range(args.repeats):
                    lens = (args.input_len, args.output_len)
                    runs.append(run_engine(model, backend, eager, num, *lens, args.device))
                    gc.collect()  # the last core's cache and graphs go before the next
                    torch.cuda.empty_cache()
                row = dict(runs[0])
                row["out_tok_s"] = statistics.median(r["out_tok_s"] for r in runs)
                row["out_tok_s_runs"] = [round(r["out_tok_s"], 1) for r in runs]
                row["decode_step_ms_p50"] = statistics.median(r["decode_step_ms_p50"] for r in runs)
                print(json.dumps(row), flush=True)
                rows.append(row)
                out.write_text(json.dumps(rows, indent=1))


def summary(folder: Path) -> None:
    kernel = folder / "kernel.json"
    engine = folder / "engine.json"
    lines = []
    if kernel.exists():
        lines += [
            "attention, one layer, bf16 (ms, do_bench median; GB/s of K/V read)",
            f"{'case':<24}{'batch':>6}{'ctx':>6}{'torch ms':>10}{'triton ms':>11}"
            f"{'x':>7}{'triton GB/s':>13}{'rel err':>10}",
        ]
        for r in json.loads(kernel.read_text()):
            lines.append(
                f"{r['case']:<24}{r['batch']:>6}{r['ctx']:>6}{r['torch_ms']:>10.3f}"
                f"{r['triton_ms']:>11.3f}{r['speedup']:>7.1f}{r['triton_GBps']:>13.0f}"
                f"{r['rel_err_vs_torch']:>10.1e}"
            )
    if engine.exists():
        lines += [
            "",
            "engine, random 100M Llama bf16, N x 128 in / 128 out greedy (median of runs);"
            " N=1: decode step = TPOT",
            f"{'backend':<8}{'graphs':>7}{'N':>5}{'out tok/s':>11}{'decode step ms':>16}"
            f"{'runs':>24}",
        ]
        for r in json.loads(engine.read_text()):
            lines.append(
                f"{r['backend']:<8}{'on' if r['graphs'] else 'off':>7}{r['num_seqs']:>5}"
                f"{r['out_tok_s']:>11.0f}{r['decode_step_ms_p50'] or float('nan'):>16.2f}"
                f"{str(r['out_tok_s_runs']):>24}"
            )
    text = "\n".join(lines)
    (folder / "summary.txt").write_text(text + "\n")
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["kernel", "engine", "summary", "tune"])
    p.add_argument("folder", nargs="?", default=".")
    p.add_argument("--out", type=Path)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sizes", default="1,64,256", help="engine: numbers of requests")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--device", default="cuda", help="engine: cpu only to smoke-test this script")
    p.add_argument("--tuning", type=Path, help="kernel/engine: launch shapes from `tune`")
    args = p.parse_args()
    if args.what == "summary":
        return summary(Path(args.folder))
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: these measurements need one")
    apply_tuning(args.tuning)
    if args.what == "tune":
        tune(args.out)
    elif args.what == "kernel":
        kernel_bench(args.out)
    else:
        engine_bench(args.out, args)


if __name__ == "__main__":
    main()
