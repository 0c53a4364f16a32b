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


def hub_cache_entry(cache: Path, repo_id: str) -> Path:
    """The snapshot folder of `repo_id` in a Hugging Face cache laid out as huggingface_hub lays it out (one
    revision, `main`): files put there are what an offline `hf_hub_download(repo_id, ...)` returns."""
    snapshot = cache / f"models--{repo_id.replace('/', '--')}" / 'snapshots' / ('0' * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot.parent.parent / 'refs').mkdir(exist_ok=True)
    (snapshot.parent.parent / 'refs' / 'main').write_text('0' * 40)
    return snapshot
