"""Results on disk: one directory per experiment with ``result.json`` and ``rows.csv``.

``result.json`` holds everything the report needs: the experiment's name, preset,
config, data set, environment (package versions, git commit), every run with its
rows, and the analysis computed from those rows. ``rows.csv`` is the same rows,
flat, for other tools. Non-finite numbers are written as null, so the JSON is
standard.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULT_FILE = "result.json"
ROWS_FILE = "rows.csv"


def environment() -> dict[str, Any]:
    """Versions, machine and git commit, for the record."""
    import batchnorm

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "batchnorm": getattr(batchnorm, "__version__", "unknown"),
        "git_commit": git_commit(),
        "cpus": os.cpu_count(),
        "torch_threads_per_run": torch.get_num_threads(),
    }


def git_commit() -> str | None:
    """The commit of the checkout the package runs from, or None (not a checkout, no git)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    try:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return commit + ("+dirty" if dirty else "")


def now() -> str:
    """The local time, ISO 8601 to the second."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def clean(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None and tuples by lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return clean(value.item())
    return value


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; results are not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_record(directory: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``result.json`` and its rows as ``rows.csv`` in ``directory``."""
    record = clean(record)
    path = directory / RESULT_FILE
    write_atomic(path, json.dumps(record, indent=1, allow_nan=False) + "\n")
    write_atomic(directory / ROWS_FILE, rows_csv(record["runs"]))
    return path


def rows_csv(runs: list[dict[str, Any]]) -> str:
    """All runs' rows as CSV: label, seed, params, outcome, then the row's own fields."""
    import io

    fixed = ["label", "seed", "params", "outcome"]
    keys: list[str] = []
    for run in runs:
        for row in run["rows"]:
            for k, v in row.items():
                if k not in keys and not isinstance(v, (list, dict)):
                    keys.append(k)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(fixed + keys)
    for run in runs:
        params = ";".join(f"{k}={v}" for k, v in run["params"].items())
        for row in run["rows"]:
            writer.writerow([run["label"], run["seed"], params, run["outcome"]]
                            + ["" if row.get(k) is None else row.get(k) for k in keys])
    return buf.getvalue()


def load_records(directory: Path) -> list[dict[str, Any]]:
    """Every ``*/result.json`` under ``directory`` (one level), sorted by directory name.

    Raises:
        FileNotFoundError: ``directory`` does not exist or holds no results.
        ValueError: a result file is not valid JSON or lacks the expected keys.
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"results directory not found: {directory}")
    records = []
    for path in sorted(directory.glob(f"*/{RESULT_FILE}")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(record, dict):
            raise ValueError(  # noqa: TRY004 - one exception type for every damaged file
                f"{path}: not a lab result (a JSON {type(record).__name__}, not an object)")
        missing = [k for k in ("experiment", "config", "runs") if k not in record]
        if missing:
            raise ValueError(f"{path}: not a lab result (missing {', '.join(missing)})")
        if not isinstance(record["runs"], list) or not all(
            isinstance(r, dict) for r in record["runs"]
        ):
            raise ValueError(f"{path}: not a lab result ('runs' is not a list of objects)")
        record["_path"] = str(path)
        records.append(record)
    if not records:
        raise FileNotFoundError(f"no */{RESULT_FILE} in {directory}")
    return records
