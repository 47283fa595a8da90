import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """scikit-learn's digits as a class-folder image tree of 32x32 RGB PNGs (1797 images)."""
    from sample_data import write_digits_folder

    return write_digits_folder(str(tmp_path_factory.mktemp("digits")), size=32)
