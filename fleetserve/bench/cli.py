"""`fleetserve bench`: load-test an OpenAI-compatible endpoint; `fleetserve bench compare`.

    fleetserve bench --url http://127.0.0.1:8000 --model NAME [options]
    fleetserve bench compare A/bench.json B/bench.json ...

Units: --rate in sessions (requests, or conversations for multi-turn) per second, --duration
and --request-timeout in seconds, --slo-ttft and --slo-tpot in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from fleetserve.bench.config import (
    ENDPOINTS,
    SLO,
    WORKLOADS,
    BenchSpec,
    LengthSpec,
    LoadConfig,
    TargetConfig,
    WorkloadConfig,
)

if TYPE_CHECKING:
    from fleetserve.bench.tokenizer import TextSource

logger = logging.getLogger(__name__)

DEFAULT_NUM_REQUESTS = 200
SHAREGPT_SIGMA = 1.0  # lognormal sigma of sharegpt-like lengths: a long tail, p99 ~ 10x median
SHAREGPT_MAX_FACTOR = 8  # sharegpt-like lengths are clipped at 8x their mean by default


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="load-test an OpenAI-compatible endpoint and report latency and throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_arguments(parser)
    sub = parser.add_subparsers(dest="bench_command", metavar="{compare}")
    compare = sub.add_parser(
        "compare", help="side-by-side table of bench.json files, with ratios to the first"
    )
    compare.add_argument("files", nargs="+", type=Path, help="bench.json files")

    def main(args: argparse.Namespace) -> int:
        # Mistakes in the arguments or the files become usage errors; failures during a run
        # keep their traceback.
        try:
            if args.bench_command == "compare":
                return compare_main(args)
            spec, text_source = build_spec(args)
        except (ValueError, OSError) as exc:
            parser.error(str(exc))
        return run_main(spec, text_source)

    parser.set_defaults(func=main)


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("not a JSON object")
    return value


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    target = p.add_argument_group("target")
    target.add_argument("--url", help="server root, e.g. http://127.0.0.1:8000 (/v1 optional)")
    target.add_argument("--model", help="model name to send (default: first of /v1/models)")
    target.add_argument("--endpoint", choices=ENDPOINTS, default="chat")
    target.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'; never written")
    target.add_argument("--temperature", type=float, default=0.0)
    target.add_argument(
        "--ignore-eos", action="store_true", help="send the extra field ignore_eos: true"
    )
    target.add_argument(
        "--extra-body", type=_json_object, default={}, help="JSON object merged into every body"
    )
    target.add_argument("--request-timeout", type=float, default=600.0, help="seconds")

    work = p.add_argument_group("workload")
    work.add_argument("--workload", choices=WORKLOADS, default="random")
    work.add_argument("--tokenizer", help="HF tokenizer folder or .gguf file for exact prompts")
    work.add_argument("--input-len", type=int, default=128, help="tokens (mean)")
    work.add_argument("--output-len", type=int, default=128, help="max_tokens (mean)")
    work.add_argument("--input-len-std", type=float, default=0.0, help="normal spread")
    work.add_argument("--output-len-std", type=float, default=0.0, help="normal spread")
    work.add_argument(
        "--range-ratio", type=float, default=0.0, help="uniform lengths in mean*(1 +- ratio)"
    )
    work.add_argument("--max-input-len", type=int, help="clip input lengths")
    work.add_argument("--max-output-len", type=int, help="clip output lengths")
    work.add_argument("--num-groups", type=int, default=4, help="shared-prefix groups")
    work.add_argument("--prefix-len", type=int, default=512, help="shared-prefix tokens")
    work.add_argument("--num-conversations", type=int, default=20, help="multi-turn sessions")
    work.add_argument("--turns", type=int, default=3, help="multi-turn turns per conversation")

    load = p.add_argument_group("load")
    load.add_argument("--rate", type=float, default=math.inf, help="sessions/s (default: inf)")
    load.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the gaps: 1 = Poisson, <1 bursty, >1 regular, inf = constant rate",
    )
    load.add_argument("--concurrency", type=int, help="max sessions in flight")
    load.add_argument(
        "--ramp-up",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="closed loop: start the --concurrency streams evenly over this time, not at once",
    )
    load.add_argument("--num-requests", type=int, help=f"default {DEFAULT_NUM_REQUESTS}")
    load.add_argument("--duration", type=float, help="seconds; no new session after it")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--warmup", type=int, default=0, help="requests sent first, not counted")
    load.add_argument("--slo-ttft", type=float, help="TTFT objective in ms, for goodput")
    load.add_argument("--slo-tpot", type=float, help="TPOT objective in ms, for goodput")

    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, help="output folder (default: bench-out/LABEL-TIME)")
    out.add_argument("--label", help="name of this run in reports (default: HOST:PORT)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--no-plots", action="store_true", help="no PNG plots")


def _lengths(args: argparse.Namespace) -> tuple[LengthSpec, LengthSpec]:
    if args.workload == "sharegpt-like":
        if args.input_len_std or args.output_len_std or args.range_ratio:
            raise ValueError(
                "sharegpt-like draws lognormal lengths; drop --*-len-std/--range-ratio"
            )
        return (
            LengthSpec(
                args.input_len,
                lognormal_sigma=SHAREGPT_SIGMA,
                max=args.max_input_len or SHAREGPT_MAX_FACTOR * args.input_len,
            ),
            LengthSpec(
                args.output_len,
                lognormal_sigma=SHAREGPT_SIGMA,
                max=args.max_output_len or SHAREGPT_MAX_FACTOR * args.output_len,
            ),
        )
    return (
        LengthSpec(args.input_len, args.input_len_std, args.range_ratio, max=args.max_input_len),
        LengthSpec(args.output_len, args.output_len_std, args.range_ratio, max=args.max_output_len),
    )


def _num_sessions(args: argparse.Namespace) -> int | None:
    if args.workload == "multi-turn":
        if args.num_requests is not None:
            raise ValueError("multi-turn counts --num-conversations, not --num-requests")
        return args.num_conversations
    if args.num_requests is None and args.duration is None:
        return DEFAULT_NUM_REQUESTS
    return args.num_requests


def _model_from_server(target_url: str, api_key: str | None) -> str:
    import httpx

    probe = TargetConfig(url=target_url, model="?", api_key=api_key)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(
            probe.base_url + "/v1/models", headers=headers, timeout=30, trust_env=False
        )
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"no --model given and {probe.base_url}/v1/models failed: {exc}") from exc


def build_spec(args: argparse.Namespace) -> tuple[BenchSpec, TextSource]:
    """The validated run and its prompt builder; ValueError for a mistake in the arguments."""
    from fleetserve.bench.tokenizer import load_tokenizer

    if not args.url:
        raise ValueError("--url is required (or use: fleetserve bench compare FILES)")
    # httpx logs every request at INFO: thousands of lines that hide the progress bar.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    model = args.model or _model_from_server(args.url, args.api_key)
    input_len, output_len = _lengths(args)
    label = args.label or urlparse(args.url).netloc or "bench"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    spec = BenchSpec(
        target=TargetConfig(
            url=args.url,
            model=model,
            endpoint=args.endpoint,
            api_key=args.api_key,
            temperature=args.temperature,
            ignore_eos=args.ignore_eos,
            extra_body=args.extra_body,
            request_timeout_s=args.request_timeout,
        ),
        workload=WorkloadConfig(
            kind=args.workload,
            input_len=input_len,
            output_len=output_len,
            num_groups=args.num_groups,
            prefix_len=args.prefix_len if args.workload == "shared-prefix" else 0,
            turns=args.turns if args.workload == "multi-turn" else 1,
        ),
        load=LoadConfig(
            num_sessions=_num_sessions(args),
            duration_s=args.duration,
            rate=args.rate,
            burstiness=args.burstiness,
            concurrency=args.concurrency,
            ramp_up_s=args.ramp_up,
            warmup=args.warmup,
            seed=args.seed,
        ),
        slo=SLO(ttft_ms=args.slo_ttft, tpot_ms=args.slo_tpot),
        label=label,
        out_dir=args.out or Path("bench-out") / f"{label.replace(':', '_')}-{stamp}",
        tokenizer=args.tokenizer,
        progress=not args.no_progress,
        plots=not args.no_plots,
    )
    return spec, load_tokenizer(args.tokenizer)


def run_main(spec: BenchSpec, text_source: TextSource) -> int:
    from fleetserve.bench.benchmark import run_benchmark
    from fleetserve.bench.report import summary_table

    target = spec.target
    logger.info("benchmarking %s (%s) -> %s", target.base_url, target.model, spec.out_dir)
    report, files = run_benchmark(spec, text_source)
    print(f"\nfleetserve bench: {spec.label}, {spec.workload.kind}, {target.endpoint}\n")
    print(summary_table(report))
    print("\nwrote " + ", ".join(str(f) for f in files))
    return 0 if report["summary"]["requests"]["completed"] > 0 else 1


def compare_main(args: argparse.Namespace) -> int:
    from fleetserve.bench.compare import compare_table, labels_for, load_report

    reports = [load_report(path) for path in args.files]
    print(compare_table(reports, labels_for(reports, args.files)))
    return 0
