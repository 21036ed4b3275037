"""The ``packmask`` console script: parse first, import the library only for real work.

``import packmask`` imports torch and transformers (it registers ``attn_implementation="packmask"``),
which takes seconds. This launcher loads ``packmask/cli/parser.py`` (standard library only) by
path *without* importing the package, so ``packmask --help``, every subcommand's ``--help``,
``--version`` and usage errors answer at once; then it hands the parsed arguments to
:func:`packmask.cli.main.run`. ``python -m packmask`` runs the same command but imports the
package first (Python always does, for ``-m``).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["main"]


def _load_parser_module():
    spec = importlib.util.find_spec("packmask")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("packmask is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "cli" / "parser.py"
    module_spec = importlib.util.spec_from_file_location("_packmask_cli_parser", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; returns the exit status."""
    args = _load_parser_module().build_parser().parse_args(argv)  # --help / errors exit here
    from packmask.cli.main import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
