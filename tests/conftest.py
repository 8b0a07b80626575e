import os
import sys

# Test helpers (hf_tiny, realdata, ...) live at tests/; the tests mirror the package in subfolders.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA compiling small programs once: skip LLVM's optimisation passes
# (matmuls and convolutions call the same runtime kernels either way; the loops XLA emits itself
# run unoptimised, which tiny test shapes do not notice). ~10-15% less wall time. Subprocesses
# (the 8-device mesh workers, CLI runs) inherit it. A flag the caller set wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import pytest  # noqa: E402

from swiftjax.data.paths import data_dir  # noqa: E402


@pytest.fixture(scope="session")
def shared_data():
    d = data_dir()
    if d is None:
        pytest.skip("../shared/data is absent (set SWIFTJAX_DATA to the data folder to run this test)")
    return d
