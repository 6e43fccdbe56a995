"""The report: one self-contained HTML page built from a results directory alone.

It opens with a scorecard (claim, experiment, measured number, verdict), states the
verdict rule, then gives each experiment a section with its verdicts, plots (PNG,
embedded as base64 data URIs), numbers, criterion, runs, config and environment.
Sections come in the registry's order; each is built from its own result file.
"""

from __future__ import annotations

import base64
import html
import sys
import traceback
from pathlib import Path
from typing import Any

from batchnorm.lab import plots, results, stats
from batchnorm.lab.experiments import REGISTRY
from batchnorm.lab.experiments.base import CHECK_RULE, SPREAD_RULE, VERDICTS, Analysis

REPORT_FILE = "report.html"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-top: 1em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.verdict { font-weight: 600; white-space: nowrap; }
.supported { color: #11632a; background: #e3f4e7; }
.not-supported { color: #8f1d1d; background: #fbe6e6; }
.mixed { color: #7a5a00; background: #fdf3d8; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
.note { color: #555; font-size: 0.92em; }
.error { color: #8f1d1d; background: #fbe6e6; padding: 0.5em; white-space: pre-wrap; }
code { background: #f5f5f5; padding: 0 0.2em; }
details { margin: 0.5em 0; }
"""


def build(results_dir: Path, out_file: Path | None = None) -> Path:
    """Write the report for ``results_dir``; return its path (default ``DIR/report.html``).

    Raises:
        FileNotFoundError: the directory holds no results.
    """
    records = results.load_records(results_dir)
    order = list(REGISTRY)
    records.sort(key=lambda r: (order.index(r["experiment"]) if r["experiment"] in order
                                else len(order), r["experiment"]))
    sections, rows = [], []
    for record in records:
        section, verdict_rows = _section(record)
        sections.append(section)
        rows += verdict_rows
    page = _page(results_dir, records, rows, sections)
    out = out_file if out_file is not None else results_dir / REPORT_FILE
    results.write_atomic(out, page)
    return out


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _statement(row: dict[str, Any]) -> str:
    """A verdict's statement, marked when it is a check (holds by construction)."""
    return ("check: " if row.get("check") else "") + str(row["statement"])


def _verdict_cell(verdict: str) -> str:
    return f'<td class="verdict {verdict.replace(" ", "-")}">{_e(verdict)}</td>'


def _table(rows: list[tuple[Any, Any]], header: tuple[str, str] | None = None) -> str:
    head = f"<tr><th>{_e(header[0])}</th><th>{_e(header[1])}</th></tr>" if header else ""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table>{head}{body}</table>"


def _section(record: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The experiment's HTML section and its scorecard rows."""
    name = record["experiment"]
    anchor = f"exp-{_e(name)}"
    exp = REGISTRY.get(name)
    if exp is None:
        missing = (f'<section id="{anchor}"><h2>{_e(name)}</h2><p class="error">No experiment '
                   f"called {_e(name)} is registered in this version; its results are not shown."
                   "</p></section>")
        return missing, []
    parts = [f'<section id="{anchor}"><h2>{_e(exp.title)} <code>{_e(name)}</code></h2>',
             f"<p>{_e(exp.description)}</p>"]
    verdict_rows: list[dict[str, Any]] = []
    try:
        analysis = exp.analyze(record)
    except Exception:  # noqa: BLE001 - a damaged record must not take the whole report down
        analysis = Analysis()
        parts.append(f'<p class="error">analysis failed:\n{_e(traceback.format_exc())}</p>')
        print(f"warning: {name}: analysis failed", file=sys.stderr)
    if analysis.verdicts:
        parts.append("<table><tr><th>claim</th><th>as tested</th><th>measured</th>"
                     "<th>criterion</th><th>verdict</th></tr>")
        for v in analysis.verdicts:
            parts.append(f"<tr><td>{v.claim}</td><td>{_e(_statement(v.__dict__))}</td>"
                         f"<td>{_e(v.measured)}"
                         f"</td><td>{_e(v.criterion)}</td>{_verdict_cell(v.verdict)}</tr>")
            verdict_rows.append({"experiment": name, "anchor": anchor, **v.__dict__})
        parts.append("</table>")
    parts.append(f"<p><b>Criterion.</b> {_e(exp.criterion)}</p>")
    try:
        figures = exp.figures(record)
    except Exception:  # noqa: BLE001 - as above, for plotting
        figures = []
        parts.append(f'<p class="error">plotting failed:\n{_e(traceback.format_exc())}</p>')
        print(f"warning: {name}: plotting failed", file=sys.stderr)
    for i, (caption, fig) in enumerate(figures):
        data = base64.b64encode(plots.png(fig)).decode("ascii")
        parts.append(f'<figure><img alt="{_e(name)} figure {i + 1}" '
                     f'src="data:image/png;base64,{data}"><figcaption>{_e(caption)}'
                     "</figcaption></figure>")
    if analysis.measures:
        parts.append("<h3>Numbers</h3>")
        header = ("measure", "value: mean (min..max) over seeds")
        parts.append(_table(list(analysis.measures.items()), header))
    try:
        parts.append(_runs_table(record))
    except Exception:  # noqa: BLE001 - runs of another version may lack a field
        parts.append(f'<p class="error">runs table failed:\n{_e(traceback.format_exc())}</p>')
        print(f"warning: {name}: runs table failed", file=sys.stderr)
    parts.append("<details><summary>Config</summary>"
                 + _table([(k, v) for k, v in record["config"].items()]) + "</details>")
    env = {**record.get("environment", {}), "preset": record.get("preset"),
           "started": record.get("started"), "wall time (s)": f"{record.get('wall_s', 0):.1f}",
           "data": ", ".join(f"{k}: {v}" for k, v in record.get("data", {}).items()),
           "overrides": record.get("overrides") or "none"}
    parts.append("<details><summary>Environment and data</summary>"
                 + _table(list(env.items())) + "</details>")
    parts.append("</section>")
    return "\n".join(parts), verdict_rows


def _runs_table(record: dict[str, Any]) -> str:
    """Outcomes per configuration: runs, divergences, mean final accuracy, time."""
    chance = 1.0 / max(1, record.get("data", {}).get("classes", 10))
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in record["runs"]:
        groups.setdefault(run["label"], []).append(run)
    rows = []
    for label, group in groups.items():
        div = [r for r in group if stats.diverged(r)]
        outcome = (f"{len(div)} diverged (steps {', '.join(str(r['diverged_step']) for r in div)})"
                   if div else "completed")
        accs = [stats.final_accuracy(r, chance) for r in group]
        rows.append(f"<tr><td>{_e(label)}</td><td>{len(group)}</td><td>{_e(outcome)}</td>"
                    f"<td>{_e(stats.fmt_range(accs, 2, 100))}</td>"
                    f"<td>{sum(r['wall_s'] for r in group):.1f}</td></tr>")
    return ("<details><summary>Runs</summary><table><tr><th>configuration</th><th>seeds</th>"
            "<th>outcome</th><th>final test accuracy (%)</th><th>train time (s)</th></tr>"
            + "".join(rows) + "</table></details>")


def _page(results_dir: Path, records: list[dict[str, Any]], rows: list[dict[str, Any]],
          sections: list[str]) -> str:
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    checks = sum(bool(r.get("check")) for r in rows)
    score = [("<table><tr><th>claim</th><th>as tested</th><th>experiment</th><th>measured</th>"
              "<th>verdict</th></tr>")]
    for r in sorted(rows, key=lambda r: r["claim"]):
        score.append(f"<tr><td>{r['claim']}</td><td>{_e(_statement(r))}</td>"
                     f'<td><a href="#{r["anchor"]}">{_e(r["experiment"])}</a></td>'
                     f"<td>{_e(r['measured'])}</td>{_verdict_cell(r['verdict'])}</tr>")
    score.append("</table>")
    presets = sorted({str(r.get("preset")) for r in records})
    total = sum(r.get("wall_s", 0.0) for r in records)
    env = records[0].get("environment", {})
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>batchnorm lab report</title>
<style>{_CSS}</style>
</head>
<body>
<h1>batchnorm lab report</h1>
<p class="note">Results in <code>{_e(results_dir)}</code>; preset {_e(', '.join(presets))};
{len(records)} experiment(s), {sum(len(r['runs']) for r in records)} runs, {total:.0f} s of
experiment time; torch {_e(env.get('torch'))}, batchnorm {_e(env.get('batchnorm'))},
commit {_e(env.get('git_commit') or 'unknown')}. Report written {_e(results.now())}.</p>
<h2>Scorecard</h2>
<p>{sum(counts.values())} verdicts{f" ({checks} of them checks, rows that verify an identity)" if checks else ""}:
{counts['supported']} supported, {counts['mixed']} mixed, {counts['not supported']} not
supported. Every verdict below is computed from the runs in this directory.</p>
{''.join(score)}
<p class="note"><b>The verdict rule.</b> {_e(SPREAD_RULE)} A diverged run (NaN or infinite
loss) is an outcome, not an error: it scores chance accuracy and never reaches a target.
{_e(CHECK_RULE)}</p>
{''.join(sections)}
</body>
</html>
"""
