"""Benchmark reports: every script in benchmarks/ reports its results through this module, the same way.

A report is a markdown file benchmarks/results/<name>_<device>_<yyyymmdd>.md: a title, the machine it ran on
(date, CPU and cores, torch threads, versions, GPU), the results table, notes, and the JSON summary in a ```json
block. The same text goes to stdout with the file's path, and the JSON summary is always the last line printed, so
that a caller can read it with `tail -n 1`.

The scripts run as `python benchmarks/bench_<name>.py`, so this folder is sys.path[0] and they import this module
as `report`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The processor's name from /proc/cpuinfo (Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "triton not installed"
    return f"triton {triton.__version__}"


def machine_lines(device: str, *, extra_versions: Iterable[str] = ()) -> list[str]:
    """Markdown bullets naming the date, the CPU (cores, torch threads), the versions and, on CUDA, the GPU.

    extra_versions: more "<package> <version>" entries for the versions line (e.g. megatron-core, transformers).
    """
    versions = [f"torch {torch.__version__}", f"python {platform.python_version()}", _triton_version()]
    lines = [
        f"- date: {datetime.date.today().isoformat()}",
        f"- cpu: {cpu_model()}, {os.cpu_count()} cores; torch threads: {torch.get_num_threads()}",
        f"- {', '.join([*versions, *extra_versions])}",
    ]
    if device == "cuda":
        lines.append(f"- gpu: {torch.cuda.get_device_name()}, cuda {torch.version.cuda}")
    return lines


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], *, align: str = "") -> list[str]:
    """A markdown table's lines. align: one letter per column, "l" or "r" (missing letters: "l"). A row shorter
    than the header (e.g. one that carries an error message) is padded with empty cells."""
    rule = ["---:" if align[i : i + 1] == "r" else "---" for i in range(len(header))]
    lines = [f"| {' | '.join(header)} |", f"|{'|'.join(rule)}|"]
    for row in rows:
        cells = [str(cell) for cell in row] + [""] * (len(header) - len(row))
        lines.append(f"| {' | '.join(cells)} |")
    return lines


def write_report(
    name: str,
    device: str,
    *,
    title: str,
    machine: Sequence[str],
    table: Sequence[str],
    notes: Sequence[str] = (),
    summary: dict,
) -> Path:
    """Write benchmarks/results/<name>_<device>_<yyyymmdd>.md, print it, and print the JSON summary last.

    The summary is {"bench": name, "device": device, **summary}. Returns the file's path.
    """
    summary_line = json.dumps({"bench": name, "device": device, **summary})
    body = [f"# {title}", "", *machine, "", *table, ""]
    if notes:
        body += [*notes, ""]
    path = RESULTS_DIR / f"{name}_{device}_{datetime.date.today():%Y%m%d}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*body, "```json", summary_line, "```"]) + "\n")
    print("\n".join(body[:-1]))
    print(f"written to {path}")
    print(summary_line)
    return path
