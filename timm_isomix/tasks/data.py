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

    Small subsets held in memory make several epochs cheap on a CPU. `classes` is the number of class
    folders, or a list of class folder names: all of the folder's (checked), or some of them, which
    makes a task of those classes only (label = position in the list; e.g. 20 of mini-ImageNet's 100).
    Raises ValueError when the folder's classes are not the task's.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f'task {task!r}: no {split}/ folder in {root}')
    ds = ImageFolder(str(folder))  # the default loader converts to RGB: grey digits get 3 channels
    if isinstance(classes, int):
        if len(ds.classes) != classes:
            raise ValueError(f'task {task!r} declares {classes} classes but {folder} has {len(ds.classes)}: {ds.classes}')
        idx = list(range(len(ds)))
        label = list(range(len(ds.classes)))
    else:
        names = list(map(str, classes))
        missing = [c for c in names if c not in ds.classes]
        if missing or len(set(names)) != len(names) or not names:
            raise ValueError(f'task {task!r} declares classes {names} but {folder} has {ds.classes} '
                             f'(missing: {missing}; names must be distinct and at least one)')
        position = {ds.class_to_idx[c]: i for i, c in enumerate(names)}
        idx = [i for i, (_, y) in enumerate(ds.samples) if y in position]
        label = [position.get(y, -1) for y in range(len(ds.classes))]
    if limit is not None and limit < len(idx):
        idx = sorted(random.Random(seed).sample(idx, limit))
    tf = transforms.Compose([
        transforms.Resize((img_size, img_size)), transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    xs = torch.stack([tf(ds.loader(ds.samples[i][0])) for i in idx])
    ys = torch.tensor([label[ds.samples[i][1]] for i in idx])
    return TensorDataset(xs, ys)
