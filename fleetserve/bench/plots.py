"""PNG plots of a report, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Every plot is a function of the report alone, so plots can be redrawn from a stored JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_SIZE = (6.4, 4.0)


def _figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=_SIZE, layout="tight")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _cdf(values: list[float], title: str, xlabel: str, path: Path) -> Path:
    fig, ax = _figure()
    ordered = sorted(values)
    n = len(ordered)
    ax.step(ordered, [(i + 1) / n for i in range(n)], where="post")
    ax.set(title=title, xlabel=xlabel, ylabel="fraction of requests", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def _series(t: list[float], y: list[float], title: str, ylabel: str, path: Path) -> Path:
    fig, ax = _figure()
    ax.step(t, y, where="post")
    ax.set(title=title, xlabel="time since start (s)", ylabel=ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """ttft_cdf.png, e2e_cdf.png, output_throughput.png, running_requests.png in `out_dir`.
    A CDF is skipped when no request has the value."""
    out_dir.mkdir(parents=True, exist_ok=True)
    label = report["label"]
    done = [r for r in report["requests"] if r["error"] is None]
    written = []
    for key, name in (("ttft_ms", "TTFT"), ("e2e_ms", "end-to-end latency")):
        values = [r[key] for r in done if r[key] is not None]
        if values:
            path = out_dir / f"{key.removesuffix('_ms')}_cdf.png"
            written.append(_cdf(values, f"{name} CDF ({label})", f"{name} (ms)", path))
    ts = report["timeseries"]
    written.append(
        _series(
            ts["t_s"],
            ts["output_tokens_per_s"],
            f"output tokens/s ({label})",
            "output tokens/s",
            out_dir / "output_throughput.png",
        )
    )
    written.append(
        _series(
            ts["t_s"],
            ts["running_requests"],
            f"running requests ({label})",
            "requests in flight",
            out_dir / "running_requests.png",
        )
    )
    return written
