"""The course's notebooks: lessons/ generated from solutions/, and their shape as lessons."""

import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_lessons", ROOT / "scripts" / "make_lessons.py")
make_lessons = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_lessons)

SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


def test_lessons_are_generated_from_the_current_solutions(capsys):
    assert SOLUTIONS, "no notebooks in solutions/"
    status = make_lessons.main(["--check"])
    assert status == 0, capsys.readouterr().out


def test_a_solution_block_becomes_a_stub_at_its_indentation():
    source = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n\nprint(f)"
    lines = make_lessons.strip_solutions(source, "test").splitlines()
    assert lines[:2] == ["def f(x):", "    y = 1"]
    assert lines[2] == "    # YOUR CODE HERE"
    assert lines[3].startswith("    raise NotImplementedError(")
    assert "return x + y" not in "\n".join(lines) and lines[-1] == "print(f)"


@pytest.mark.parametrize(
    "source, message",
    [
        ("### BEGIN SOLUTION\nx = 1\n### END SOLUTION", "inside a function body"),
        ("def f():\n    ### BEGIN SOLUTION\n    return 1", "never closed"),
        ("def f():\n    return 1\n    ### END SOLUTION", "without"),
    ],
)
def test_malformed_solution_blocks_are_refused(source, message):
    with pytest.raises(ValueError, match=message):
        make_lessons.strip_solutions(source, "nb")


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_each_notebook_is_a_complete_lesson(path):
    solution = nbformat.read(path, as_version=4)
    lesson = nbformat.read(ROOT / "lessons" / path.name, as_version=4)
    first = solution.cells[0]
    assert first.cell_type == "markdown" and "Learning goals" in first.source
    markdown = "\n".join(c.source for c in solution.cells if c.cell_type == "markdown")
    assert "## Summary" in markdown and "## Going further" in markdown
    code = [c.source for c in solution.cells if c.cell_type == "code"]
    exercises = sum(src.count(make_lessons.BEGIN) for src in code)
    checks = sum(src.count("exercises.check_") for src in code)
    assert checks >= exercises, "every exercise needs a check-yourself cell"
    lesson_code = "\n".join(c.source for c in lesson.cells if c.cell_type == "code")
    assert "BEGIN SOLUTION" not in lesson_code and lesson_code.count("NotImplementedError") >= exercises
    for cell in lesson.cells:
        if cell.cell_type == "code" and make_lessons.CHECKED not in cell.source:
            assert not cell.outputs, "lesson cells start without outputs"
    for cell in solution.cells:
        if cell.cell_type == "code" and make_lessons.CHECKED in cell.source:
            assert cell.outputs, "a checked cell needs its stored output in the solution"
