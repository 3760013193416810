"""Eval results -> rich tables on the console, a JSON file, and PNG figures.

An eval *result* is a dict ``{"perplexity": [rows of perplexity_by_length], "passkey": [rows of passkey_grid]}``
(either key may be missing). Several results are passed as a mapping ``label -> result`` (e.g. ``{"before": ...,
"after": ...}``) and appear side by side in the tables and on one plot.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional

from rich.console import Console
from rich.table import Table


def _console(console: Optional[Console]) -> Console:
    return console if console is not None else Console()


def perplexity_table(runs: Mapping[str, dict], title: str = "Held-out perplexity by context length") -> Table:
    """One row per length, one perplexity column per run label (plus a change column for exactly two runs)."""
    labels = list(runs)
    table = Table(title=title)
    table.add_column("length", justify="right")
    for label in labels:
        table.add_column(f"ppl {label}", justify="right")
    if len(labels) == 2:
        table.add_column("change", justify="right")
    table.add_column("tokens", justify="right")
    by_label = {lb: {r["length"]: r for r in runs[lb].get("perplexity", [])} for lb in labels}
    lengths = sorted({n for rows in by_label.values() for n in rows})
    for n in lengths:
        cells = [str(n)]
        vals = [by_label[lb].get(n, {}).get("ppl") for lb in labels]
        cells += ["-" if v is None else f"{v:.3f}" for v in vals]
        if len(labels) == 2:
            a, b = vals
            cells.append("-" if a is None or b is None else f"{100.0 * (b - a) / a:+.1f}%")
        toks = {by_label[lb][n]["tokens"] for lb in labels if n in by_label[lb]}
        cells.append("/".join(str(t) for t in sorted(toks)))
        table.add_row(*cells)
    return table


def passkey_table(runs: Mapping[str, dict], title: str = "Passkey retrieval accuracy") -> Table:
    """One row per (length, depth), one accuracy column per run label."""
    labels = list(runs)
    table = Table(title=title)
    table.add_column("length", justify="right")
    table.add_column("depth", justify="right")
    for label in labels:
        table.add_column(f"acc {label}", justify="right")
    by_label = {lb: {(r["length"], r["depth"]): r for r in runs[lb].get("passkey", [])} for lb in labels}
    for key in sorted({k for rows in by_label.values() for k in rows}):
        cells = [str(key[0]), f"{key[1]:.2f}"]
        for lb in labels:
            r = by_label[lb].get(key)
            cells.append("-" if r is None else f"{r['accuracy']:.2f} ({round(r['accuracy'] * r['trials'])}/{r['trials']})")
        table.add_row(*cells)
    return table


def print_results(runs: Mapping[str, dict], *, console: Optional[Console] = None) -> list[Table]:
    """Print a perplexity table and a passkey table (those with data) for the labelled runs; returns them."""
    console = _console(console)
    tables = []
    if any(r.get("perplexity") for r in runs.values()):
        tables.append(perplexity_table(runs))
    if any(r.get("passkey") for r in runs.values()):
        tables.append(passkey_table(runs))
    for t in tables:
        console.print(t)
    return tables


def compare_tables(before: dict, after: dict, *, console: Optional[Console] = None,
                   labels: tuple[str, str] = ("before", "after")) -> list[Table]:
    """Print ``before`` and ``after`` results side by side (perplexity with its relative change, passkey)."""
    return print_results({labels[0]: before, labels[1]: after}, console=console)


def write_json(path: str | Path, payload: object) -> Path:
    """Write ``payload`` as indented JSON (NaN/inf become null so any JSON reader accepts the file)."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(payload), indent=2) + "\n")
    return path


def plot_perplexity(runs: Mapping[str, dict], path: str | Path, title: str = "Held-out perplexity") -> Path:
    """Line plot of perplexity vs context length (log2 x axis), one line per run label."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lengths: set[int] = set()
    for label, result in runs.items():
        rows = sorted(result.get("perplexity", []), key=lambda r: r["length"])
        if rows:
            ax.plot([r["length"] for r in rows], [r["ppl"] for r in rows], marker="o", label=label)
            lengths.update(r["length"] for r in rows)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(lengths), [str(n) for n in sorted(lengths)])  # the measured lengths, not powers of 2
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_passkey(runs: Mapping[str, dict], path: str | Path, title: str = "Passkey retrieval") -> Path:
    """Heatmaps of accuracy (depth rows x length columns, 0 red .. 1 green), one panel per run label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [lb for lb, r in runs.items() if r.get("passkey")]
    if not labels:
        raise ValueError("plot_passkey: no run has passkey results")
    fig, axes = plt.subplots(1, len(labels), figsize=(1.5 + 3.5 * len(labels), 3.6), squeeze=False,
                             layout="constrained")
    im = None
    for ax, label in zip(axes[0], labels):
        rows = runs[label]["passkey"]
        lengths = sorted({r["length"] for r in rows})
        depths = sorted({r["depth"] for r in rows})
        grid = [[math.nan] * len(lengths) for _ in depths]
        for r in rows:
            grid[depths.index(r["depth"])][lengths.index(r["length"])] = r["accuracy"]
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not math.isnan(grid[i][j]):
                    ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("key depth")
        ax.set_title(f"{title}: {label}")
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir: str | Path, runs: Mapping[str, dict]) -> dict[str, Path]:
    """Write ``evals.json`` (all runs) and ``perplexity.png`` / ``passkey.png`` (where there is data) under
    ``out_dir``; returns the written paths by kind."""
    out = Path(out_dir)
    paths = {"json": write_json(out / "evals.json", dict(runs))}
    if any(r.get("perplexity") for r in runs.values()):
        paths["perplexity_png"] = plot_perplexity(runs, out / "perplexity.png")
    if any(r.get("passkey") for r in runs.values()):
        paths["passkey_png"] = plot_passkey(runs, out / "passkey.png")
    return paths
