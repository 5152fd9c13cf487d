"""The course's notebooks: lessons/ generated from solutions/, and their shape as lessons."""

import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_lessons = load_script("make_lessons", ROOT / "scripts" / "make_lessons.py")
notebook_times = load_script("notebook_times", ROOT / "benchmarks" / "notebook_times.py")

SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
MAX_SOLUTION_BYTES = 1_000_000  # RULES.md: solution notebooks ≤ 1 MB (JPEG or low dpi for image grids)


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


# ----------------------------------------------------------------------------- weight


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_a_solution_notebook_weighs_at_most_1_MB(path):
    size = path.stat().st_size
    heaviest = sorted(((len(str(c.get("outputs", ""))), i) for i, c in enumerate(nbformat.read(path, as_version=4).cells)),
                      reverse=True)[:3]
    assert size <= MAX_SOLUTION_BYTES, f"{path.name} is {size:,} bytes; heaviest cells (bytes, index): {heaviest}"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_lessons_carry_no_widget_state_and_solutions_no_stalled_progress_bars(path):
    lesson = nbformat.read(ROOT / "lessons" / path.name, as_version=4)
    assert "widgets" not in lesson.metadata, "make_lessons.py must drop metadata.widgets"
    for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
        for output in cell.get("outputs", []):
            text = str(output.get("data", {}).get("text/plain", ""))
            assert notebook_times.WIDGET_VIEW not in output.get("data", {}) or "0%|" not in text, (
                f"cell {index} stores a progress bar at 0%; write outputs with benchmarks/notebook_times.py --write")


def test_make_lesson_drops_widget_state():
    solution = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Learning goals")])
    solution.metadata["widgets"] = {notebook_times.WIDGET_STATE: {"state": {"a": {}}, "version_major": 2}}
    assert "widgets" not in make_lessons.make_lesson(solution, "nb").metadata
    assert "widgets" in solution.metadata  # the solution itself is left alone


def _bar_state(model_id: str, value: float, total: float, prefix: str, suffix: str) -> dict:
    ids = [f"{model_id}{k}" for k in "pbs"]
    state = {model_id: {"model_name": "HBoxModel", "state": {"children": [f"IPY_MODEL_{i}" for i in ids]}}}
    state[ids[0]] = {"model_name": "HTMLModel", "state": {"value": prefix}}
    state[ids[1]] = {"model_name": "FloatProgressModel", "state": {"value": value, "max": total}}
    state[ids[2]] = {"model_name": "HTMLModel", "state": {"value": suffix}}
    return state


def test_progress_bars_are_stored_as_their_final_text():
    bar = {notebook_times.WIDGET_VIEW: {"model_id": "aa"}, "text/plain": "training:   0%|          | 0/200"}
    slider = {notebook_times.WIDGET_VIEW: {"model_id": "cc"}, "text/plain": "interactive(...)"}
    cell = nbformat.v4.new_code_cell("trainer.fit()", outputs=[
        nbformat.v4.new_output("display_data", data=bar), nbformat.v4.new_output("display_data", data=slider)])
    state = {**_bar_state("aa", 200.0, 200.0, "training:\u2007100%", "\u2007200/200\u2007[00:41&lt;00:00]"),
             **_bar_state("bb", 5.0, 10.0, "unused", ""),
             "cc": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_dd"]}},
             "dd": {"model_name": "IntSliderModel", "state": {}}}
    notebook = nbformat.v4.new_notebook(cells=[cell])
    notebook.metadata["widgets"] = {notebook_times.WIDGET_STATE: {"state": state}}
    assert notebook_times.finish_progress_bars(notebook) == 1
    assert cell.outputs[0].output_type == "stream"
    assert cell.outputs[0].text == "training: 100%|██████████| 200/200 [00:41<00:00]\n"
    assert cell.outputs[1].data == slider  # other widgets keep their view and state
    assert set(notebook.metadata["widgets"][notebook_times.WIDGET_STATE]["state"]) == {"cc", "dd"}


# ----------------------------------------------------------------------------- figures


def test_show_images_labels_rows_and_refuses_a_wrong_count(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from minisd import viz

    shown = []
    monkeypatch.setattr(viz, "show_figure", lambda fig, image_format="png": shown.append((fig, image_format)))
    viz.show_images(torch.zeros(6, 1, 8, 8), ncols=3, row_labels=["original", "rebuilt"])
    fig, image_format = shown[0]
    assert image_format == "smaller"
    assert [t.get_text() for ax in fig.axes for t in ax.texts] == ["original", "rebuilt"]
    plt.close(fig)
    with pytest.raises(ValueError, match="one entry per row.*make 2 rows, got 3"):
        viz.show_images(torch.zeros(6, 1, 8, 8), ncols=3, row_labels=["a", "b", "c"])


def test_image_grids_are_stored_small():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from minisd import viz

    fig, axes = plt.subplots(3, 10, figsize=(15, 5))  # a lesson-02-sized grid of pure noise
    for ax, image in zip(axes.flat, torch.rand(30, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1):
        ax.imshow(viz.to_image(image), interpolation="nearest")
    jpeg, png = viz.figure_bytes(fig, "jpeg"), viz.figure_bytes(fig, "png")
    plt.close(fig)
    assert jpeg[:2] == b"\xff\xd8" and png[:4] == b"\x89PNG"
    assert len(jpeg) < 0.6 * len(png), (len(jpeg), len(png))


@pytest.mark.parametrize("noisy, expected", [(True, "image/jpeg"), (False, "image/png")])
def test_a_notebook_stores_the_smaller_encoding(monkeypatch, noisy, expected):
    """Noise is smaller as JPEG, flat glyph-like images as PNG; show_images stores whichever is smaller."""
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from minisd import viz

    displayed = []
    monkeypatch.setattr(matplotlib, "get_backend", lambda: "module://matplotlib_inline.backend_inline")
    monkeypatch.setattr("IPython.display.display", lambda obj: displayed.append(obj))
    if noisy:
        images = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    else:
        images = torch.full((16, 3, 64, 64), -1.0)  # black, with a white bar: a glyph-like stroke
        images[:, :, 16:48, 28:36] = 1.0
    viz.show_images(images, [f"image {i}" for i in range(16)], ncols=8)
    (image,) = displayed
    assert image._repr_mimebundle_()[0].keys() >= {expected}
