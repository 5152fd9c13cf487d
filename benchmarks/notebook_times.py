"""Time every notebook top to bottom, in fast and/or full mode, and print a table.

    python benchmarks/notebook_times.py                 # both modes, solutions/ and lessons/
    python benchmarks/notebook_times.py --mode fast solutions/01_forward_diffusion.ipynb
    python benchmarks/notebook_times.py --mode full --write solutions/*.ipynb   # store outputs

Kernel start is included, as a learner would see it. ``--write`` saves the executed notebook
in place (how solutions/ gets its outputs); regenerate lessons/ afterwards.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def run(path: Path, mode: str, write: bool, verbose: bool = False) -> float:
    """Execute one notebook in a fresh kernel; return the wall time in seconds."""
    notebook = nbformat.read(path, as_version=4)
    os.environ["MINISD_FAST"] = "1" if mode == "fast" else "0"
    start = time.perf_counter()
    def report(cell, cell_index, **_):
        if verbose:
            print(f"  cell {cell_index:3d} done at {time.perf_counter() - start:6.1f}s", flush=True)

    NotebookClient(notebook, timeout=1800, kernel_name="python3", on_cell_executed=report,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - start
    if write:
        for cell in notebook.cells:
            cell.metadata.pop("execution", None)
        nbformat.write(notebook, path)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--mode", choices=["fast", "full", "both"], default="both")
    parser.add_argument("--write", action="store_true", help="save outputs into the notebook")
    parser.add_argument("--verbose", action="store_true", help="print the time at which each cell finishes")
    args = parser.parse_args()
    paths = args.notebooks or sorted((ROOT / "solutions").glob("*.ipynb")) + sorted((ROOT / "lessons").glob("*.ipynb"))
    modes = ["fast", "full"] if args.mode == "both" else [args.mode]
    print(f"{'notebook':48s} " + " ".join(f"{m:>8s}" for m in modes))
    for path in paths:
        times = [run(path, mode, args.write, args.verbose) for mode in modes]
        print(f"{str(path.relative_to(ROOT) if path.is_absolute() else path):48s} " + " ".join(f"{t:7.1f}s" for t in times), flush=True)


if __name__ == "__main__":
    main()
