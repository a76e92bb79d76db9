"""One benchmark from configs to files: plan, warm up, run, check usage, report, plot.

The only module that ties I/O together; everything it calls is testable on its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fleetserve.bench.arrivals import arrival_times
from fleetserve.bench.client import make_http_client
from fleetserve.bench.config import BenchSpec
from fleetserve.bench.plots import write_plots
from fleetserve.bench.report import build_report, config_record, write_report
from fleetserve.bench.runner import Plan, Runner, RunOutcome
from fleetserve.bench.tokencheck import fill_expected_counts
from fleetserve.bench.tokenizer import TextSource
from fleetserve.bench.workload import generate_sessions

logger = logging.getLogger(__name__)

_ARRIVAL_STREAM = 0  # RNG stream of the schedule; workload streams are in workload.py
_WARMUP_PURPOSE = 1


def make_plan(spec: BenchSpec, text_source: TextSource) -> Plan:
    """Sessions and arrival times, all computed before the clock starts when the count is
    known. A run bounded only by a duration at an unlimited rate draws sessions lazily."""
    load = spec.load
    sessions = generate_sessions(spec.workload, text_source, load.seed)
    arrivals = None
    if not math.isinf(load.rate):
        rng = np.random.default_rng((load.seed, _ARRIVAL_STREAM))
        arrivals = arrival_times(
            load.rate, load.burstiness, rng, count=load.num_sessions, duration_s=load.duration_s
        )
        sessions = list(itertools.islice(sessions, len(arrivals)))
    elif load.num_sessions is not None:
        sessions = list(itertools.islice(sessions, load.num_sessions))
    return Plan(sessions, arrivals, load.concurrency, load.duration_s, load.ramp_up_s)


def warmup_plan(spec: BenchSpec, text_source: TextSource) -> Plan | None:
    """`load.warmup` single requests from their own RNG stream, as a closed loop."""
    count = spec.load.warmup
    if count == 0:
        return None
    stream = generate_sessions(spec.workload, text_source, spec.load.seed, _WARMUP_PURPOSE)
    sessions = [dataclasses.replace(s, turns=s.turns[:1]) for s in itertools.islice(stream, count)]
    return Plan(sessions, None, min(count, spec.load.concurrency or count))


async def execute(spec: BenchSpec, plan: Plan, warmup: Plan | None) -> RunOutcome:
    expected = None
    if isinstance(plan.sessions, list):
        expected = sum(len(s.turns) for s in plan.sessions)
    async with make_http_client(spec.target) as http:
        if warmup is not None:
            logger.info("warming up with %d requests", len(warmup.sessions))
            outcome = await Runner(spec.target, http).run(warmup)
            failed = sum(not r.ok for r in outcome.results)
            if failed:
                logger.warning("%d of %d warmup requests failed", failed, len(outcome.results))
        with tqdm(total=expected, unit="req", disable=not spec.progress, leave=False) as bar:
            runner = Runner(spec.target, http, on_result=lambda _: bar.update())
            return await runner.run(plan)


def run_benchmark(spec: BenchSpec, text_source: TextSource) -> tuple[dict[str, Any], list[Path]]:
    """Run the benchmark of `spec`; returns the report and the files written."""
    plan = make_plan(spec, text_source)
    outcome = asyncio.run(execute(spec, plan, warmup_plan(spec, text_source)))
    fill_expected_counts(outcome.results, text_source)
    config = config_record(spec.target, spec.workload, spec.load, spec.slo, spec.tokenizer)
    report = build_report(spec.label, config, outcome.results, spec.slo, outcome.duration_s)
    files = write_report(report, spec.out_dir)
    if spec.plots:
        files += write_plots(report, spec.out_dir)
    return report, files
