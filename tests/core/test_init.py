"""`import packmask` stays light (issue 9): heavy dependencies load on first use, and dir() shows them."""
import subprocess
import sys

import packmask

HEAVY = ("datasets", "numba", "rich", "matplotlib", "trl", "pyarrow")


def test_import_does_not_load_heavy_modules():
    code = ("import sys, packmask; heavy = [m for m in %r if m in sys.modules]; print(heavy); "
            "packmask.pack_lengths; print('packmask.data.assignment' in sys.modules)" % (HEAVY,))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    heavy, loaded_after_use = result.stdout.strip().splitlines()
    assert heavy == "[]", f"import packmask loaded {heavy}"
    # ...and the lazy name really loads its module on first use (numba itself waits for a kernel
    # to run: packmask.data.kernel_choice)
    assert loaded_after_use == "True"


def test_dir_lists_lazy_names():
    names = dir(packmask)
    for name in packmask._LAZY:
        assert name in names
        assert getattr(packmask, name) is not None
    assert {"configure", "PackmaskWarning", "tokenize_chat_dataset", "verify"} <= set(names)
