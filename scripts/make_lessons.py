"""Generate the learner notebooks in lessons/ from the completed notebooks in solutions/.

solutions/ is the single source. In each code cell, every block between ``### BEGIN SOLUTION``
and ``### END SOLUTION`` becomes a ``raise NotImplementedError`` stub at the same indentation.
Outputs are cleared, except in cells marked ``# NBVAL_CHECK_OUTPUT``: their stored output is
what the test suite compares against, and a lesson must print the same values as its solution.
Saved widget state (``metadata.widgets``: sliders, progress bars, and the images they last showed)
is dropped: a learner's notebook starts without outputs.

    python scripts/make_lessons.py          # regenerate lessons/
    python scripts/make_lessons.py --check  # exit 1 if lessons/ is out of date (the test does this)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
CHECKED = "# NBVAL_CHECK_OUTPUT"
STUB = 'raise NotImplementedError("Exercise: replace this line with your code, then run the check cell below.")'


def strip_solutions(source: str, where: str) -> str:
    """Replace each BEGIN/END SOLUTION block of a cell's source with a stub at its indentation."""
    out: list[str] = []
    indent: str | None = None
    for number, line in enumerate(source.splitlines(), 1):
        marker = line.strip()
        if marker == BEGIN:
            if indent is not None:
                raise ValueError(f"{where}, line {number}: nested {BEGIN}.")
            indent = re.match(r"\s*", line).group()
            if not indent:
                raise ValueError(f"{where}, line {number}: a solution block must sit inside a function body, "
                                 "so that the lesson still runs while the exercise is unsolved.")
            out.append(f"{indent}# YOUR CODE HERE")
            out.append(f"{indent}{STUB}")
        elif marker == END:
            if indent is None:
                raise ValueError(f"{where}, line {number}: {END} without {BEGIN}.")
            indent = None
        elif indent is None:
            out.append(line)
    if indent is not None:
        raise ValueError(f"{where}: {BEGIN} is never closed.")
    return "\n".join(out)


def make_lesson(solution: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """The learner's version of one solution notebook."""
    lesson = nbformat.from_dict(solution)
    lesson.metadata.pop("widgets", None)
    for index, cell in enumerate(lesson.cells):
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        cell.source = strip_solutions(cell.source, f"{name}, cell {index}")
        if CHECKED not in cell.source:
            cell.outputs = []
            cell.execution_count = None
    return lesson


def render(notebook: nbformat.NotebookNode) -> str:
    return nbformat.writes(notebook) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether lessons/ is up to date")
    args = parser.parse_args(argv)
    solutions, lessons = ROOT / "solutions", ROOT / "lessons"
    stale: list[str] = []
    expected_names = set()
    for path in sorted(solutions.glob("*.ipynb")):
        expected_names.add(path.name)
        text = render(make_lesson(nbformat.read(path, as_version=4), path.name))
        target = lessons / path.name
        if target.exists() and target.read_text(encoding="utf-8") == text:
            continue
        stale.append(path.name)
        if not args.check:
            target.write_text(text, encoding="utf-8")
    extra = sorted(p.name for p in lessons.glob("*.ipynb") if p.name not in expected_names)
    if args.check:
        if stale or extra:
            print("lessons/ is out of date; run `python scripts/make_lessons.py`.")
            print(f"  stale or missing: {stale}\n  without a solution: {extra}")
            return 1
        print("lessons/ is up to date.")
        return 0
    print(f"wrote {len(stale)} lesson(s): {stale}" + (f"; lessons without a solution: {extra}" if extra else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
