"""Writing OUTPUT so that nothing is ever half-written, and checking where it goes before any work.

Every file (data, metadata sidecar, histogram) is first written to a hidden temporary name in the
target's own folder (``.NAME.<pid>.packmask-tmp``), flushed to disk with ``fsync``, and only then
renamed over the target, all targets together, with SIGINT and SIGTERM held back during the
renames. So an interrupted or failed run leaves the previous OUTPUT byte for byte as it was and no
temporary file (the CLI turns SIGTERM into an exception so cleanup runs), and ``--force`` replaces
the old file only at that last rename. A ``save_to_disk`` folder is swapped in with two renames.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with AtomicOutputs() as outputs:
    ...     _ = outputs.stage(folder / "a.txt").write_text("new")
    >>> (folder / "a.txt").read_text(), sorted(p.name for p in folder.iterdir())
    ('new', ['a.txt'])
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

from .errors import CLIError, raise_if_stopped
from .inputs import suffix_of

__all__ = ["AtomicOutputs", "json_safe", "check_output", "check_plot_path", "write_packed", "sidecar_path", "packed_metadata",
           "METADATA_KEY", "METADATA_FILE"]

TMP_TAG = "packmask-tmp"
METADATA_KEY = b"packmask"          # Parquet schema metadata key
METADATA_FILE = "packmask.json"     # inside a save_to_disk folder
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".eps", ".ps")


def sidecar_path(output: Path) -> Path:
    """Metadata next to a JSON lines output: ``packed.jsonl`` -> ``packed.jsonl.packmask.json``."""
    return output.with_name(output.name + ".packmask.json")


def packed_metadata(path: Path) -> dict | None:
    """The metadata ``packmask pack`` recorded with ``path`` (so ``path`` is a packed output), else ``None``.

    Parquet schema metadata, a JSON lines file's sidecar, or a folder's ``packmask.json``; an
    unreadable file is ``None`` here (reading INPUT reports it).
    """
    try:
        if path.is_dir():
            text = (path / METADATA_FILE).read_text() if (path / METADATA_FILE).is_file() else None
        elif suffix_of(path) == ".parquet":
            import pyarrow.parquet as pq

            text = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
        else:
            text = sidecar_path(path).read_text() if sidecar_path(path).is_file() else None
        recorded = json.loads(text) if text else None
    except (OSError, ValueError, Exception):  # pyarrow raises several types for a damaged file
        return None
    return recorded if isinstance(recorded, dict) else None


# --------------------------------------------------------------------------- checks before work

def _first_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_folder(target: Path, what: str) -> None:
    """The folder that will hold ``target`` exists (or can be made) and takes files."""
    folder = _first_existing(target.parent)
    if not folder.is_dir():
        raise CLIError(f"{what} {target}: {folder} is a file, not a folder", f"choose another {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"{what} {target}: the folder {folder} is not writable", f"choose another {what}")
    if folder == target.parent.absolute():  # write-probe: access() says yes to root on read-only mounts
        try:
            probe = folder / f".{target.name}.{os.getpid()}.probe.{TMP_TAG}"
            probe.touch()
            probe.unlink()
        except OSError as error:
            raise CLIError(f"{what} {target}: cannot write in {folder} ({error.strerror})",
                           f"choose another {what}") from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output(output: Path, input_path: Path, force: bool) -> None:
    """Before reading INPUT: OUTPUT is not INPUT, its folder takes files, ``--force`` if it exists."""
    if _same_file(output, input_path) or (input_path.is_dir() and input_path.resolve() in output.resolve().parents) \
            or (output.is_dir() and output.resolve() in input_path.resolve().parents):
        raise CLIError(f"-o {output} is the input {input_path} (or holds it); packing would overwrite the source",
                       "choose another -o/--output")
    _check_writable_folder(output, "-o/--output")
    if not output.exists():
        return
    if not force:
        raise CLIError(f"{output} already exists", "pass --force to replace it, or choose another -o/--output")
    if output.is_dir() and not (output / "dataset_info.json").exists() and any(output.iterdir()):
        # --force replaces packed datasets we wrote, never an arbitrary folder
        raise CLIError(f"{output} is a non-empty folder that is not a saved dataset; not replacing it",
                       "choose another -o/--output")
    if output.is_file() and suffix_of(output) not in (".parquet", ".jsonl", ".json", ".ndjson", ".jsonl.gz",
                                                      ".json.gz", ".ndjson.gz"):
        raise CLIError(f"{output} is a file, and this output name would be written as a dataset folder",
                       "end -o with .parquet or .jsonl, or choose another name")


def check_plot_path(plot: Path, input_path: Path) -> None:
    if suffix_of(plot) not in PLOT_SUFFIXES:
        raise CLIError(f"--plot {plot}: unknown image type {suffix_of(plot) or '(no extension)'!r}",
                       "end --plot with .png (or .pdf, .svg)")
    if _same_file(plot, input_path):
        raise CLIError(f"--plot {plot} is the input", "choose another --plot path")
    if plot.is_dir():
        raise CLIError(f"--plot {plot} is a folder", "give --plot a file name such as hist.png")
    _check_writable_folder(plot, "--plot")


# --------------------------------------------------------------------------- atomic writing

@contextmanager
def _signals_held():
    """SIGINT / SIGTERM wait until the block ends (so renames finish as a group)."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):  # no pthread_sigmask (Windows) or not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _fsync(path: Path) -> None:
    """Flush a file, or every file of a folder and the folder itself, to disk."""
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] + [path]
    for item in paths:
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


class AtomicOutputs:
    """Stage several outputs under temporary names; rename them all into place on success only.

    ``stage(target)`` returns the temporary path to write (a file or a folder). On leaving the
    ``with`` block normally, every staged path is fsynced and renamed over its target with signals
    held; on any exception (Ctrl-C, SIGTERM, a full disk) the staged paths are deleted and the
    targets are untouched.
    """

    def __init__(self):
        self._staged: list[tuple[Path, Path]] = []

    def stage(self, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.parent / f".{target.name}.{os.getpid()}.{TMP_TAG}"
        _remove(temporary)
        self._staged.append((temporary, target))
        return temporary

    def __enter__(self) -> "AtomicOutputs":
        return self

    def __exit__(self, kind, error, trace) -> bool:
        try:
            if kind is None:
                self._commit()
        finally:
            for temporary, _ in self._staged:
                _remove(temporary)
        return False

    def _commit(self) -> None:
        for temporary, target in self._staged:
            _fsync(temporary)
        raise_if_stopped()  # a SIGTERM swallowed on the way here (a __del__) still rolls the write back
        with _signals_held():
            for temporary, target in self._staged:
                if temporary.is_dir() and target.is_dir():  # os.replace cannot replace a non-empty folder
                    old = target.parent / f".{target.name}.{os.getpid()}.old.{TMP_TAG}"
                    os.replace(target, old)
                    os.replace(temporary, target)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    if target.is_dir():
                        shutil.rmtree(target)
                    os.replace(temporary, target)
            for folder in {target.parent for _, target in self._staged}:
                _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the packed dataset

def _write_parquet(packed, path: Path, metadata: dict) -> None:
    """Parquet with datasets' own schema metadata (features) plus ``packmask`` (JSON)."""
    import pyarrow.parquet as pq

    batches = packed.with_format("arrow").iter(batch_size=10_000)
    schema = packed.data.schema
    schema = schema.with_metadata({**(schema.metadata or {}), METADATA_KEY: json.dumps(metadata).encode()})
    with pq.ParquetWriter(str(path), schema) as writer:
        for batch in batches:
            writer.write_table(batch.replace_schema_metadata(schema.metadata))


def write_packed(packed, output: Path, metadata: dict, outputs: AtomicOutputs) -> list[Path]:
    """Stage OUTPUT (parquet / jsonl by extension, else a ``save_to_disk`` folder) and its metadata.

    Returns the final paths that will exist once ``outputs`` commits.
    """
    suffix = suffix_of(output)
    if suffix == ".parquet":
        _write_parquet(packed, outputs.stage(output), metadata)
        return [output]
    if suffix in (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz"):
        write_json_lines(packed, outputs.stage(output), gzipped=suffix.endswith(".gz"))
        sidecar = sidecar_path(output)
        outputs.stage(sidecar).write_text(json.dumps(metadata, indent=2) + "\n")
        return [output, sidecar]
    folder = outputs.stage(output)
    packed.save_to_disk(str(folder))
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return [output]


def write_json_lines(packed, path: Path, gzipped: bool = False, batch_size: int = 1024) -> None:
    """Write a :class:`datasets.Dataset` (its indices mapping respected) as JSON lines, one compact object
    per row, read from Arrow a batch at a time.

    Not ``Dataset.to_json``: its pandas encoder can crash the process (SIGSEGV) when Ctrl-C / SIGTERM
    raises inside it, as the CLI's signal handler does mid-write; the standard ``json`` module unwinds,
    so the staged file is removed and the previous output kept.

    >>> import datasets, tempfile, os
    >>> rows = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8]], "seq_lengths": [[2, 1], [1]]})
    >>> path = Path(tempfile.mkdtemp()) / "rows.jsonl"
    >>> write_json_lines(rows.select([1, 0]), path)
    >>> print(path.read_text(), end="")
    {"input_ids":[8],"seq_lengths":[1]}
    {"input_ids":[5,6,7],"seq_lengths":[2,1]}
    >>> write_json_lines(datasets.Dataset.from_dict({"w": [float("nan")], "t": ["NaN"]}), path)
    >>> path.read_text()
    '{"w":null,"t":"NaN"}\\n'
    """
    import gzip

    def line(row) -> str:
        text = json.dumps(row, separators=(",", ":"))
        if "NaN" in text or "Infinity" in text:  # a non-finite float (or those words in a string): null, not NaN
            text = json.dumps(json_safe(row), separators=(",", ":"))
        return text + "\n"

    opener = gzip.open if gzipped else open
    with opener(path, "wt", encoding="utf-8") as file:
        for table in packed.with_format("arrow").iter(batch_size=batch_size):
            file.write("".join(line(row) for row in table.to_pylist()))


def json_safe(value):
    """``value`` with every NaN / infinity replaced by ``None``: JSON has no NaN (``json.dumps``
    would write the invalid token ``NaN``), and ``null`` says "not measured".

    >>> json_safe({"a": [1.5, float("nan")], "b": {"c": float("inf")}, "d": "x"})
    {'a': [1.5, None], 'b': {'c': None}, 'd': 'x'}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value
