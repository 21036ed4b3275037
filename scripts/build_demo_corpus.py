#!/usr/bin/env python3
"""Build the embedded demo corpus: docstrings of the Python standard library.

``packmask demo`` must show real text being packed and trained on with no network, so the
package ships a small corpus. Docstrings of the standard library are real English prose of
widely varied length (one line to several paragraphs), and they are covered by the PSF
License Agreement, which permits redistribution with the notice kept
(see ``src/packmask/data/LICENSE-corpus.txt``).

The harvest reads source files with :mod:`ast` (nothing is imported or executed), takes
module, class and function docstrings, skips tests, ``idlelib``, ``site-packages``,
``lib2to3``/``turtledemo`` examples and private modules, cleans indentation with
:func:`inspect.cleandoc`, drops duplicates and near-empty ones, and writes one JSON object per
line to a gzip file, sorted by source so the output is byte-for-byte reproducible for a given
Python version.

Worked example::

    $ python scripts/build_demo_corpus.py
    wrote 4775 documents (0.41 MB gz) from 404 files of Python 3.11.7
      chars per document: min 32, median 125, max 5987
      -> src/packmask/data/stdlib_docstrings.jsonl.gz

    >>> import gzip, json
    >>> rows = [json.loads(l) for l in gzip.open("src/packmask/data/stdlib_docstrings.jsonl.gz", "rt")]
    >>> sorted(rows[0])
    ['source', 'text']
"""
from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import inspect
import json
import sys
import sysconfig
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "src" / "packmask" / "data" / "stdlib_docstrings.jsonl.gz"

# Directories that are not library documentation (tests, the IDLE app, vendored code, demos).
SKIP_DIRS = {
    "test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip",
    "__pycache__", "lib-dynload", "pydoc_data", "encodings",
}
MIN_CHARS = 32          # shorter docstrings ("Return self.") teach the model nothing
MAX_CHARS = 6000        # a handful of module docstrings are whole manuals; cap them


def _is_private_path(relative: Path) -> bool:
    """True for ``_private`` modules/packages (but not ``__init__``/``__main__``)."""
    for part in relative.parts:
        stem = part[:-3] if part.endswith(".py") else part
        if stem.startswith("_") and not (stem.startswith("__") and stem.endswith("__")):
            return True
    return False


def iter_source_files(stdlib: Path):
    """Yield stdlib ``.py`` files in sorted order, skipping tests, apps and private modules."""
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if any(part in SKIP_DIRS or part.startswith(("test", "config-")) for part in relative.parts[:-1]):
            continue
        if relative.name.startswith("test"):
            continue
        if _is_private_path(relative):
            continue
        yield path, relative


def docstrings_of(tree: ast.Module, module_name: str):
    """Yield ``(qualified_name, docstring)`` for the module and every public class/function."""
    doc = ast.get_docstring(tree, clean=False)
    if doc:
        yield module_name, doc

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if child.name.startswith("_") and child.name != "__init__":
                    continue
                name = f"{prefix}.{child.name}"
                child_doc = ast.get_docstring(child, clean=False)
                if child_doc:
                    yield name, child_doc
                if isinstance(child, ast.ClassDef):
                    yield from walk(child, name)

    yield from walk(tree, module_name)


def harvest(stdlib: Path) -> tuple[list[dict], int]:
    """Return the deduplicated documents and the number of files read."""
    documents: list[dict] = []
    seen: set[str] = set()
    n_files = 0
    for path, relative in iter_source_files(stdlib):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError):
            continue
        n_files += 1
        module_name = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        for name, raw in docstrings_of(tree, module_name):
            text = inspect.cleandoc(raw).strip()
            if len(text) < MIN_CHARS:
                continue
            if len(text) > MAX_CHARS:
                # cut at a paragraph boundary so the document still reads as prose
                cut = text.rfind("\n\n", 0, MAX_CHARS)
                text = text[: cut if cut > MAX_CHARS // 2 else MAX_CHARS].rstrip()
            key = hashlib.sha1(" ".join(text.split()).encode()).hexdigest()
            if key in seen:  # e.g. the same docstring on a method and its alias
                continue
            seen.add(key)
            documents.append({"source": name, "text": text})
    return documents, n_files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="standard library directory to harvest (default: this Python's)")
    args = parser.parse_args(argv)

    documents, n_files = harvest(args.stdlib)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents).encode()
    # mtime=0 and no filename in the header: identical input gives an identical file
    with open(args.output, "wb") as raw, gzip.GzipFile(
        filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0
    ) as gz:
        gz.write(payload)
    size_mb = args.output.stat().st_size / 1e6
    lengths = sorted(len(d["text"]) for d in documents)
    print(
        f"wrote {len(documents)} documents ({size_mb:.2f} MB gz) from {n_files} files of "
        f"Python {sys.version.split()[0]}\n"
        f"  chars per document: min {lengths[0]}, median {lengths[len(lengths) // 2]}, "
        f"max {lengths[-1]}\n  -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
