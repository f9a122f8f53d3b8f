"""Test-wide set-up: 8 simulated CPU devices (before jax is imported) so sharding tests run anywhere, and one
XLA compilation cache for the whole run."""

import os
import shutil
import tempfile

from xla_env import xla_flags  # tests/ is on sys.path (conftest's directory)

# The scheduler flag avoids an XLA:CPU collective deadlock seen on 2-core machines with a (1,2,4) mesh.
os.environ.setdefault("XLA_FLAGS", xla_flags(8) + " --xla_cpu_enable_concurrency_optimized_scheduler=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests (and the subprocesses they start, which inherit the environment) compile the very same programs:
# a stage's train step again on resume, the random-init fine-tune after the pretrained one, two runs that
# differ only in data. JAX's persistent cache keys each program by its HLO, devices, compile options and jax
# version, so a hit returns the executable the same compile would have produced. The directory is this
# run's alone (shared by its xdist workers) and removed at the end: every run starts cold, as CI does.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"bart_jax_tests_xla_{_RUN_ID}")
    # Every program, not only those over a second to compile: the suite repeats many small ones.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    _OWN_CACHE = True
else:
    _OWN_CACHE = False


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the controller, after every worker is done
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
