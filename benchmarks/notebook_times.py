"""Time every notebook top to bottom, in fast and/or full mode, and print a table.

    python benchmarks/notebook_times.py                 # both modes, solutions/ and lessons/
    python benchmarks/notebook_times.py --mode fast solutions/01_forward_diffusion.ipynb
    python benchmarks/notebook_times.py --mode full --write solutions/*.ipynb   # store outputs

Kernel start is included, as a learner would see it. ``--write`` saves the executed notebook
in place (how solutions/ gets its outputs); regenerate lessons/ afterwards. Before saving, each
tqdm progress bar (a widget whose text fallback was captured at "0%") becomes the text of its
final state, "training: 100%|██████████| 200/200 [00:41<00:00, …]", and the widget state that
only those bars used is dropped.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
BAR_WIDTH = 10  # tqdm's bar width in its text fallback


def _progress_text(state: dict, model_id: str) -> str | None:
    """The final text of a tqdm bar (an HBox of HTML prefix, FloatProgress, HTML suffix), else None."""
    box = state.get(model_id, {})
    children = [c.removeprefix("IPY_MODEL_") for c in box.get("state", {}).get("children", [])]
    kinds = [state.get(c, {}).get("model_name") for c in children]
    if box.get("model_name") != "HBoxModel" or kinds != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    prefix, bar, suffix = (state[c]["state"] for c in children)
    filled = round(BAR_WIDTH * bar["value"] / bar["max"]) if bar.get("max") else 0
    text = f"{prefix['value']}|{'█' * filled}{' ' * (BAR_WIDTH - filled)}|{suffix['value']}"
    return html.unescape(text).replace("\u2007", " ")


def finish_progress_bars(notebook) -> int:
    """Replace every tqdm widget output by its final text; drop widget state no output uses. Returns the count."""
    state = notebook.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    replaced = 0
    for cell in notebook.cells:
        for i, output in enumerate(cell.get("outputs", [])):
            view = output.get("data", {}).get(WIDGET_VIEW)
            text = _progress_text(state, view["model_id"]) if view else None
            if text is not None:
                cell.outputs[i] = nbformat.v4.new_output("stream", name="stderr", text=text + "\n")
                replaced += 1
    used = set()  # every model reachable from a widget output that is still there
    todo = [o["data"][WIDGET_VIEW]["model_id"] for c in notebook.cells for o in c.get("outputs", [])
            if WIDGET_VIEW in o.get("data", {})]
    while todo:
        model_id = todo.pop()
        if model_id not in used and model_id in state:
            used.add(model_id)
            todo += re.findall(r"IPY_MODEL_([0-9a-f]+)", str(state[model_id]["state"]))
    for model_id in set(state) - used:
        del state[model_id]
    if not state:
        notebook.metadata.pop("widgets", None)
    return replaced


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
        finish_progress_bars(notebook)
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
