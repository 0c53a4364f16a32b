import os
from pathlib import Path

import pytest
import torch

# The tests' datasets: ../shared/data beside the checkout unless $ISOMIX_DATA names another folder (the library
# only reads the folder it is given). Set before the tests import anything that reads it.
_SHARED_DATA = Path(__file__).resolve().parent.parent.parent / 'shared' / 'data'
if not os.environ.get('ISOMIX_DATA') and _SHARED_DATA.is_dir():
    os.environ['ISOMIX_DATA'] = str(_SHARED_DATA)

from timm_isomix.train.datasets import find_archive, prepare_dataset  # noqa: E402


@pytest.fixture(scope='session')
def shared_dataset():
    """prepare_dataset(name), skipping the test (with the reason) when the archive is not available."""
    def get(name: str):
        if find_archive(name) is None:
            pytest.skip(f'{name}.tar.gz not found: set ISOMIX_DATA or place ../shared/data beside the checkout')
        return prepare_dataset(name)
    return get


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (two threads wait on each other on a busy 2-core CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
