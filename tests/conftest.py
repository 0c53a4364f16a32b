import pytest

from timm_isomix.datasets import find_archive, prepare_dataset


@pytest.fixture(scope='session')
def shared_dataset():
    """prepare_dataset(name), skipping the test (with the reason) when the archive is not available."""
    def get(name: str):
        if find_archive(name) is None:
            pytest.skip(f'{name}.tar.gz not found: set ISOMIX_DATA or place ../shared/data beside the checkout')
        return prepare_dataset(name)
    return get
