"""What every benchmark does at the end: write its JSON atomically under ``$OUT`` and exit nonzero
when a correctness check inside it failed (a benchmark that printed "failed" and exited 0 would
hide a wrong result)."""
import json
import os
import sys


def finish(name: str, record: dict, failures: list[str], out: str | None = None) -> None:
    out = out if out is not None else os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"{name}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(path + ".tmp", path)
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
