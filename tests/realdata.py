"""The real data in ../shared/data (or $SWIFTJAX_DATA), for the tests that read it.

Written out here, not imported from swiftjax, so the tests check the library's own constants."""
import pytest

from swiftjax.data.paths import data_dir

GSM8K_KEYS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


def data_file(name: str):
    """Path of ``name`` in the data folder; skips the test (saying why) when it is absent."""
    d = data_dir()
    if d is None or not (d / name).is_file():
        pytest.skip(f"real data {name} not found (../shared/data or $SWIFTJAX_DATA)")
    return d / name
