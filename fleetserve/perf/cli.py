"""`fleetserve profile [MODEL]`: measure the engine's step times on this machine and write a
cost model for `fleetserve simulate`.

    fleetserve profile MODEL --out costs/smollm2-cpu.json [engine options of `serve`]

Takes the engine options of `fleetserve serve` (the cost model is true of those settings
only) and prints the fit's error on held-out steps.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    from fleetserve.options import add_serve_arguments

    parser = subparsers.add_parser(
        "profile",
        help="measure the engine's step times and fit a cost model for fleetserve simulate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_serve_arguments(parser)
    parser.add_argument(
        "--out", type=Path, default=Path("bench-out/cost_model.json"), help="JSON file to write"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small grid (seconds, for a tiny model or a test)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the grid this many times and fit each step's fastest time (steadier on a "
        "busy machine)",
    )

    def main(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, TypeError) as exc:
            parser.error(str(exc))

    parser.set_defaults(func=main)


QUICK_GRID = {
    "prefill_tokens": (8, 32, 64),
    "decode_batches": (1, 4),
    "context_lens": (16, 48),
    "decode_steps": 2,
    "mixed_prefill_tokens": (16,),
    "repeats": 2,
}


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fleetserve.engine.config import EngineConfig
    from fleetserve.engine.core import build_engine_core
    from fleetserve.options import (
        SERVER_ENGINE_DEFAULTS,
        default_model,
        engine_fields,
        resolve_options,
    )
    from fleetserve.perf.profile import ProfileGrid, profile_core

    options = resolve_options(args)
    model = options.get("model") or default_model()
    engine_kwargs = dict(SERVER_ENGINE_DEFAULTS)
    engine_kwargs.update({n: options[n] for n, _ in engine_fields() if n in options})
    config = EngineConfig(model=model, **engine_kwargs)
    grid = ProfileGrid(**QUICK_GRID) if args.quick else ProfileGrid(repeats=args.repeats)
    core = build_engine_core(config, progress=not args.no_progress)
    import torch

    weights = next(core.runner.model.parameters())
    meta = {
        "model": model,
        "dtype": config.dtype,
        "weights_dtype": str(weights.dtype).removeprefix("torch."),
        "hardware": {"torch_threads": torch.get_num_threads(), "device": str(config.device)},
    }
    with tqdm(total=grid.num_points, unit="shape", disable=args.no_progress) as bar:
        cost_model = profile_core(core, grid, meta, progress=bar.update)
    cost_model.save(args.out)
    fit = cost_model.meta["fit"]
    held = fit["heldout"]
    print(f"fleetserve profile: {fit['train_steps']} steps fitted, {fit['heldout_steps']} held out")
    for term, value in cost_model.coefficients.items():
        print(f"  {term:<24} {value:.6g} s")
    print(
        f"held-out error: mean {held['mean_rel_error']:.1%}, p50 {held['p50_rel_error']:.1%}, "
        f"p90 {held['p90_rel_error']:.1%}, max {held['max_rel_error']:.1%}"
    )
    print(f"wrote {args.out}")
    return 0
