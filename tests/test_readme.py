"""The README's quickstart runs as printed and shows no contamination."""
import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs_as_printed():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "README.md", "exec"), {})
    value = float(buf.getvalue().strip().split("=")[-1])
    assert value < 1e-5, buf.getvalue()


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    block = re.findall(r"```bash\n(.*?)```", text, re.S)[0]
    for line in block.strip().splitlines():
        command = line.split("#")[0].strip()
        assert command in ci, f"README command {command!r} is not what .ci/run runs"
