import os
import sys

# Test helpers (hf_tiny, realdata, ...) live at tests/; the tests mirror the package in subfolders.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Parity tests compare float32 matmuls: make XLA:CPU use full precision.
os.environ.setdefault("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))

import pytest  # noqa: E402

from swiftjax.data.paths import data_dir  # noqa: E402


@pytest.fixture(scope="session")
def shared_data():
    d = data_dir()
    if d is None:
        pytest.skip("../shared/data is absent (set SWIFTJAX_DATA to the data folder to run this test)")
    return d
