"""The real image datasets shipped as ImageFolder archives (`NAME.tar.gz` -> `NAME/{train,val}/<class>/`).

A dataset is named by a folder holding train/ and val/, or by a name: `NAME/` or `NAME.tar.gz` in the
folder given (`data_dir`), else in `$ISOMIX_DATA`. Archives are unpacked once into `$ISOMIX_CACHE`
(default `~/.cache/timm-isomix/datasets`). The library knows no other place: scripts and tests say where
their data are.
"""
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import List, Optional

__all__ = ['ARCHIVES', 'data_dirs', 'find_archive', 'prepare_dataset']

ARCHIVES = ('cifar10', 'imagenette128', 'miniimagenet32', 'mnist', 'mnistm', 'usps')


def data_dirs(data_dir: Optional[str] = None) -> List[Path]:
    """Where datasets are looked for, in order: `data_dir`, then `$ISOMIX_DATA`."""
    return [Path(d) for d in (data_dir, os.environ.get('ISOMIX_DATA')) if d]


def _is_image_folder(path: Path) -> bool:
    return (path / 'train').is_dir() and (path / 'val').is_dir()


def find_archive(name: str, data_dir: Optional[str] = None) -> Optional[Path]:
    for d in data_dirs(data_dir):
        if (d / f'{name}.tar.gz').is_file():
            return d / f'{name}.tar.gz'
    return None


def prepare_dataset(name: str, data_dir: Optional[str] = None, cache_dir: Optional[str] = None) -> Path:
    """Return the ImageFolder root (holding train/ and val/) of dataset `name`, unpacking it on first use.

    `name` is a folder holding train/ and val/, or the name of one (or of its `.tar.gz` archive) in
    `data_dir` or `$ISOMIX_DATA`. Raises FileNotFoundError naming the places searched.
    """
    if Path(name).is_dir():
        return Path(name)
    for d in data_dirs(data_dir):
        if _is_image_folder(d / name):
            return d / name
    cache = Path(cache_dir or os.environ.get('ISOMIX_CACHE') or Path.home() / '.cache' / 'timm-isomix' / 'datasets')
    root = cache / name
    if (root / 'train').is_dir() and (root / 'val').is_dir():
        return root
    archive = find_archive(name, data_dir)
    if archive is None:
        raise FileNotFoundError(
            f'dataset {name!r}: no folder of that name and no {name}/ or {name}.tar.gz in any of '
            f'{[str(d) for d in data_dirs(data_dir)]} (give the folder holding the datasets: a data dir, '
            f'or set ISOMIX_DATA)')
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
