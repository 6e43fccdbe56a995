"""Markdown tables of ratios from one or more result files of the same benchmark.

Each run's JSON (``{"environment": ..., "rows": [...]}`` from _harness.write_results)
contributes one ratio per row key; a cell shows the range over the runs ("1.02–1.05",
or one value), so repeat runs can be quoted together as docs/benchmarks.md does; with
``--median`` the family table's cells are "median (range)", for many runs on a noisy
machine, where one run's outlier sets the range.

    python benchmarks/tables.py family results/run1/family.json results/run2/family.json
    python benchmarks/tables.py family --median results/run*/family.json
    python benchmarks/tables.py act --median results/run*/family.json
    python benchmarks/tables.py cpu results/run1/cpu.json results/run2/cpu.json
    python benchmarks/tables.py fold results/run1/family.json results/run2/family.json
    python benchmarks/tables.py network results/run1/network.json results/run2/network.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: bench_family's layer names and their column titles (runs before 2026-12-02 have no
#: "BNAct(relu)" rows: an empty cell).
FAMILY_LAYERS = {"Ghost(N/4)": "Ghost (N/4)", "Renorm": "Renorm", "BNAct(relu)": "BNAct (relu)",
                 "BNAct(relu,+res)": "BNAct (relu, +res)"}


def _load(paths: list[Path]) -> list[list[dict[str, Any]]]:
    return [json.loads(p.read_text())["rows"] for p in paths]


def _span(values: list[float], digits: int = 2) -> str:
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if f"{lo:.{digits}f}" == f"{hi:.{digits}f}":
        return f"{lo:.{digits}f}"
    return f"{lo:.{digits}f}–{hi:.{digits}f}"


def _median_span(values: list[float]) -> str:
    if len(values) < 3:
        return _span(values)
    return f"{statistics.median(values):.2f} ({_span(values)})"


def _by_shape(
    runs: list[list[dict[str, Any]]],
    values: Callable[[dict[str, Any]], dict[str, float]],
    columns: list[str],
    header: str,
    median: bool,
) -> str:
    """One table line per (shape, layout) in first-seen order, one cell per column:
    the range (or median and range) over the runs of what ``values`` gives each row
    for that column."""
    cells: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    order: list[tuple[str, str]] = []
    for rows in runs:
        for row in rows:
            picked = values(row)
            if not picked:
                continue
            key = (row["shape"].replace("x", "×"), row["layout"])
            if key not in order:
                order.append(key)
            for column, value in picked.items():
                cells[key][column].append(value)
    cell = _median_span if median else _span
    lines = [header, "|---|---|" + "---:|" * len(columns)]
    for key in order:
        lines.append(f"| {key[0]} | {key[1]} | "
                     + " | ".join(cell(cells[key][c]) for c in columns) + " |")
    return "\n".join(lines)


def family_table(runs: list[list[dict[str, Any]]], median: bool = False) -> str:
    """Shape × layout rows, one column per family layer: family / core ratios (their
    range over the runs, or the median and the range)."""
    return _by_shape(
        runs,
        lambda row: {row["layer"]: row["ratio"]} if row["layer"] in FAMILY_LAYERS else {},
        list(FAMILY_LAYERS),
        "| shape | layout | " + " | ".join(FAMILY_LAYERS.values()) + " |",
        median,
    )


def act_table(runs: list[list[dict[str, Any]]], median: bool = False) -> str:
    """BatchNormAct against the torch composite each row names (bench_family's
    ``vs_peer``; runs before 2026-12-02 have none), and against the core layer."""
    return _by_shape(
        runs,
        lambda row: (
            {row["layer"] + " peer": row["vs_peer"], row["layer"] + " core": row["ratio"]}
            if "vs_peer" in row else {}
        ),
        [f"{layer} {against}" for layer in ("BNAct(relu)", "BNAct(relu,+res)")
         for against in ("peer", "core")],
        "| shape | layout | BNAct (relu) / torch BN + relu_ | BNAct (relu) / core "
        "| BNAct (relu, +res) / torch BN + add_ + relu_ | BNAct (relu, +res) / core |",
        median,
    )


def _with_ratios(
    runs: list[list[dict[str, Any]]],
) -> Iterator[tuple[dict[str, Any], list[float]]]:
    """Each row of the first run with its ratio in every run (rows matched by position:
    the runs of one script list the same rows in the same order)."""
    for i, row in enumerate(runs[0]):
        yield row, [rows[i]["ratio"] for rows in runs if i < len(rows)]


def cpu_table(runs: list[list[dict[str, Any]]]) -> str:
    """The core benchmark: first run's times, every run's ratio."""
    lines = [
        "| shape | layout | mode | path | batchnorm ms | torch ms | ratio (runs) |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for row, ratios in _with_ratios(runs):
        lines.append(
            f"| {row['shape'].replace('x', '×')} | {row['layout']} | {row['mode']} | "
            f"{row['path']} | {row['batchnorm_ms']:.3f} | {row['torch_ms']:.3f} | "
            f"{_span(ratios)} |"
        )
    return "\n".join(lines)


def fold_table(runs: list[list[dict[str, Any]]]) -> str:
    """fold rows: folded / unfolded and the no-BN floor, ranges over the runs."""
    cells: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rows in runs:
        for row in rows:
            if row["layer"].startswith("fold"):
                cell = cells[row["layer"]]
                cell["unfolded"].append(row["baseline_ms"])
                cell["folded"].append(row["ratio"])
                cell["floor"].append(row["floor_ratio"])
    lines = [
        "| model | unfolded ms | folded / unfolded | floor / unfolded |",
        "|---|---:|---:|---:|",
    ]
    for name, cell in cells.items():
        lines.append(
            f"| {name.removeprefix('fold ')} | {_span(cell['unfolded'], 1)} | "
            f"{_span(cell['folded'])} | {_span(cell['floor'])} |"
        )
    return "\n".join(lines)


def network_table(runs: list[list[dict[str, Any]]]) -> str:
    """bench_network's training steps: first run's times, every run's ratio."""
    lines = [
        "| model | layout | ours ms | torch ms | ours / torch |",
        "|---|---|---:|---:|---:|",
    ]
    for row, ratios in _with_ratios(runs):
        lines.append(
            f"| {row['layer'].removeprefix('train step ')} | {row['layout']} | "
            f"{row['ms']:.1f} | {row['baseline_ms']:.1f} | {_span(ratios)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["family", "act", "cpu", "fold", "network"])
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--median", action="store_true",
                        help="family, act: cells as median (range) over three or more runs")
    args = parser.parse_args()
    runs = _load(args.files)
    if args.kind == "family":
        print(family_table(runs, args.median))
    elif args.kind == "act":
        print(act_table(runs, args.median))
    else:
        tables = {"cpu": cpu_table, "fold": fold_table, "network": network_table}
        print(tables[args.kind](runs))


if __name__ == "__main__":
    main()
