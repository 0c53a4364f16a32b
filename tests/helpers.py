"""Helpers shared by the tests: the root scripts as modules, and tiny ImageFolders of real images."""
import importlib.util
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    """train.py / validate.py at the repository root, imported as a module (to call its main())."""
    spec = importlib.util.spec_from_file_location(f'_{name}_script', ROOT / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tiny_folder(src: Path, dst: Path, train_per_class: int, val_per_class: int) -> Path:
    """An ImageFolder of the first few real images per class of a shared dataset."""
    for split, n in (('train', train_per_class), ('val', val_per_class)):
        for cls in sorted(os.listdir(src / split)):
            (dst / split / cls).mkdir(parents=True, exist_ok=True)
            for f in sorted(os.listdir(src / split / cls))[:n]:
                shutil.copy(src / split / cls / f, dst / split / cls / f)
    return dst
