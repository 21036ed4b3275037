"""packmask.data.numba_cache: a read-only install (no writable __pycache__, no writable user cache)
still imports and caches; plain numba refuses the same decoration (the control)."""
import os
import subprocess
import sys
import textwrap

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")

KERNEL = textwrap.dedent("""
    import numba
    from {module} import njit

    @njit(cache=True)
    def plus_one(x):
        return x + 1

    assert plus_one(41) == 42
    print("CACHE_DIR after:", repr(numba.config.CACHE_DIR))
""")


def _run(tmp_path, module):
    pkg = tmp_path / "install"
    pkg.mkdir(exist_ok=True)
    (pkg / "__pycache__").write_text("a file where numba would make its cache folder")  # in-tree cache unusable
    (pkg / "kernel_mod.py").write_text(KERNEL.format(module=module))
    blocked = tmp_path / "not_a_dir"
    blocked.write_text("")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(SRC), str(pkg)]),
               XDG_CACHE_HOME=str(blocked / "cache"), HOME=str(blocked / "home"), TMPDIR=str(tmp_path / "tmp"),
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("NUMBA_CACHE_DIR", None)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-c", "import kernel_mod"], env=env, capture_output=True, text=True,
                          cwd=str(tmp_path))


def test_read_only_install_falls_back_to_temp_cache(tmp_path):
    done = _run(tmp_path, "packmask.data.numba_cache")
    assert done.returncode == 0, done.stderr
    assert "CACHE_DIR after: ''" in done.stdout          # the process-wide setting is left as it was
    cached = [f for _, _, files in os.walk(tmp_path / "tmp") for f in files]
    assert any(f.endswith(".nbi") for f in cached), cached  # the kernel was cached in the fallback folder


def test_plain_numba_refuses_the_same_install(tmp_path):
    done = _run(tmp_path, "numba")
    assert done.returncode != 0 and "cannot cache" in done.stderr
