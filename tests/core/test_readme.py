"""The README's quickstart runs as printed and shows no contamination."""
import contextlib
import io
import pathlib
import re

README = next(p for p in pathlib.Path(__file__).resolve().parents if (p / "pyproject.toml").is_file()) / "README.md"


def _quickstart_error(code: str) -> float:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "README.md", "exec"), {})
    return float(buf.getvalue().strip().split("=")[-1])


def test_readme_quickstart_runs_as_printed():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    assert _quickstart_error(code) < 1e-5


def test_readme_quickstart_control_detects_contamination():
    """The same recipe with one causal block over the whole row (documents see each other) fails."""
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    contaminated = code.replace("block_diagonal_mask([[5, 4, 3]])", "block_diagonal_mask([[12]])")
    assert contaminated != code
    assert _quickstart_error(contaminated) > 1e-2


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    block = re.findall(r"```bash\n(.*?)```", text, re.S)[0]
    for line in block.strip().splitlines():
        command = line.split("#")[0].strip()
        assert command in ci, f"README command {command!r} is not what .ci/run runs"


def test_ci_floor_leg_tests_the_declared_floor():
    """.ci/run's second leg pins the lower bound of transformers in pyproject.toml, and the README
    states the tested range from that floor."""
    root = README.parent
    floor = re.search(r'"transformers>=([0-9.]+)"', (root / "pyproject.toml").read_text()).group(1)
    ci = (root / ".ci" / "run").read_text()
    assert re.search(r'FLOOR_TRANSFORMERS="([0-9.]+)"', ci).group(1).startswith(floor)
    assert '-m "not multiprocess"' in ci and "python3 -m venv" in ci
    assert f"transformers **{floor} – " in README.read_text()
