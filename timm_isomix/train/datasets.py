"""The real image datasets shipped as ImageFolder archives (`NAME.tar.gz` -> `NAME/{train,val}/<class>/`).

Archives are looked up in `$ISOMIX_DATA` (a folder), else in `../shared/data` beside the project
checkout, and unpacked once into `$ISOMIX_CACHE` (default `~/.cache/timm-isomix/datasets`).
"""
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import List, Optional

__all__ = ['ARCHIVES', 'data_dirs', 'find_archive', 'prepare_dataset']

ARCHIVES = ('cifar10', 'imagenette128', 'miniimagenet32', 'mnist', 'mnistm', 'usps')
_REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dirs() -> List[Path]:
    """Where archives are looked for, in order."""
    dirs = [Path(os.environ['ISOMIX_DATA'])] if os.environ.get('ISOMIX_DATA') else []
    return dirs + [_REPO_ROOT.parent / 'shared' / 'data', Path.cwd().parent / 'shared' / 'data']


def find_archive(name: str) -> Optional[Path]:
    for d in data_dirs():
        if (d / f'{name}.tar.gz').is_file():
            return d / f'{name}.tar.gz'
    return None


def prepare_dataset(name: str, cache_dir: Optional[str] = None) -> Path:
    """Return the ImageFolder root (holding train/ and val/) of dataset `name`, unpacking it on first use.

    `name` may also be a folder that already holds train/ and val/. Raises FileNotFoundError naming
    the places searched when neither the folder nor the archive exists.
    """
    if Path(name).is_dir():
        return Path(name)
    cache = Path(cache_dir or os.environ.get('ISOMIX_CACHE') or Path.home() / '.cache' / 'timm-isomix' / 'datasets')
    root = cache / name
    if (root / 'train').is_dir() and (root / 'val').is_dir():
        return root
    archive = find_archive(name)
    if archive is None:
        raise FileNotFoundError(
            f'dataset {name!r}: no folder of that name and no {name}.tar.gz in any of '
            f'{[str(d) for d in data_dirs()]} (set ISOMIX_DATA to the folder holding the archives)')
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{name}-', dir=cache))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter='data')
        src = tmp / name if (tmp / name).is_dir() else tmp
        if not (root / 'train').is_dir():  # another process may have won the race
            os.replace(src, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
