"""The environment of a test's child process that compiles with Inductor (a fresh process: nothing of the
tests that ran before it in the parent)."""

from __future__ import annotations

import os

# what the child needs from the parent; everything else that earlier tests or libraries left in os.environ
# stays out of it
KEPT = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "TRITON_INTERPRET", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
        "TRANSFORMERS_OFFLINE")


def compile_env(cache_dir, pythonpath: list[str], threads: int = 1) -> dict:
    """A clean environment that compiles into `cache_dir`, with Inductor's kernel builds in the process itself.
    Under two pytest-xdist workers, children of a worker failed to load kernels they had just built ("undefined
    symbol ... basic_ostringstream", raised through Inductor's compile-worker pool), at random, never when run
    alone; their own cache dir alone did not fix it. In-process builds and a clean environment leave nothing shared
    with the parent but the installed packages."""
    env = {k: os.environ[k] for k in KEPT if k in os.environ}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(cache_dir), TORCHINDUCTOR_COMPILE_THREADS="1",
               OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(map(str, pythonpath)))
    return env
