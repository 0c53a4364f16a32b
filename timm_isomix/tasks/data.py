"""Task data held in memory: a seeded subset of an ImageFolder split as tensors."""
import random
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch.utils.data import TensorDataset
from torchvision import transforms
from torchvision.datasets import ImageFolder

__all__ = ['load_task_data']


def load_task_data(
        root: Union[str, Path],
        split: str,
        classes: Union[int, Sequence[str]],
        img_size: int = 32,
        limit: Optional[int] = None,
        seed: int = 0,
        task: str = '',
) -> TensorDataset:
    """A (random, seeded) subset of an ImageFolder split as tensors: RGB (grey repeated), resized, in [-1, 1].

    Small subsets held in memory make several epochs cheap on a CPU. Raises ValueError when the
    folder's classes are not the task's (`classes`: a count or the list of class folder names).
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f'task {task!r}: no {split}/ folder in {root}')
    ds = ImageFolder(str(folder))  # the default loader converts to RGB: grey digits get 3 channels
    if isinstance(classes, int):
        if len(ds.classes) != classes:
            raise ValueError(f'task {task!r} declares {classes} classes but {folder} has {len(ds.classes)}: {ds.classes}')
    elif list(map(str, classes)) != ds.classes:
        raise ValueError(f'task {task!r} declares classes {list(classes)} but {folder} has {ds.classes}')
    idx = list(range(len(ds)))
    if limit is not None and limit < len(ds):
        idx = sorted(random.Random(seed).sample(idx, limit))
    tf = transforms.Compose([
        transforms.Resize((img_size, img_size)), transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    xs = torch.stack([tf(ds.loader(ds.samples[i][0])) for i in idx])
    ys = torch.tensor([ds.samples[i][1] for i in idx])
    return TensorDataset(xs, ys)
