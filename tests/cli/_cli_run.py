"""What the in-process CLI tests share (tests/cli/test_cli_records.py, tests/cli/test_cli_pack_images.py):
run ``packmask ARGS`` through ``packmask.cli.main.main`` in this process, and check a one-line error."""
from __future__ import annotations

from packmask.cli.main import main


def run(capsys, *args):
    """``(exit status, stdout, stderr lines)`` of ``packmask ARGS`` run in this process."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def assert_error(result, *fragments):
    """The command failed (status 2) with ONE ``error: ... fix: ...`` line holding every fragment."""
    code, out, err = result
    assert code == 2, (code, out, err)
    assert len(err) == 1 and err[0].startswith("error: ") and "fix:" in err[0], err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
