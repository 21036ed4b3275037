"""What every benchmark does at the end: write its JSON atomically under ``$OUT`` and exit nonzero
when a correctness check inside it failed (a benchmark that printed "failed" and exited 0 would
hide a wrong result)."""
import json
import os
import sys
import traceback


def write_json(path: str, record: dict) -> None:
    """Write ``record`` to ``path`` atomically (a temp file in the same folder, then a rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


def finish(name: str, record: dict, failures: list[str], out: str | None = None) -> None:
    out = out if out is not None else os.environ.get("OUT")
    if out:
        write_json(os.path.join(out, f"{name}.json"), record)
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)


def record_error(result: dict, failures: list[str], label: str, error: BaseException) -> None:
    """A method that raised: its one-line error into ``result["error"]`` and ``failures`` (``label: error``),
    the traceback printed; reported and failing, never hidden."""
    result["error"] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
    failures.append(f"{label}: {result['error']}")
    traceback.print_exc()


def chosen_methods(text: str, known) -> list[str]:
    """The comma-separated ``--methods`` in ``text``, each one of ``known`` (else exit naming them)."""
    methods = [m for m in text.split(",") if m]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {known}")
    return methods
