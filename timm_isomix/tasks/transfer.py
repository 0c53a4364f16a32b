"""Transfer to a new task by learning only a new mixture (and head) over a frozen bank.

A new task gets its own mixture logits and head (and its own BatchNorm statistics, re-estimated on
its data); the bank and stem stay frozen. Baselines on the same model: a linear probe (head only,
statistics frozen) and full fine-tuning (everything).
"""
from typing import List, Optional, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..models.multitask import MultiTaskIsoMix, count_params
from .fit import fit_tasks

__all__ = ['TRANSFER_MODES', 'freeze_for_transfer', 'transfer', 'reestimate_stats']

TRANSFER_MODES = ('mixture', 'linear', 'full')


def freeze_for_transfer(model: MultiTaskIsoMix, task: str, mode: str = 'mixture') -> List[nn.Parameter]:
    """Set requires_grad for training `task` alone and return the trainable parameters.

    mode 'mixture': the task's own mixture logits and head (bank, stem, shared mixture, other tasks frozen);
    'linear': the head only; 'full': every parameter of the model (bank included).
    """
    if mode not in TRANSFER_MODES:
        raise ValueError(f'unknown transfer mode {mode!r}; expected one of {TRANSFER_MODES}')
    path = model._path(task)
    if mode == 'full':
        trainable = list(model.stem.parameters()) + list(model.bank.parameters()) + list(path.parameters())
    elif mode == 'linear':
        trainable = list(path.head.parameters())
    else:
        trainable = model.task_parameters(task)
    ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return [p for p in model.parameters() if p.requires_grad]


def transfer(
        model: MultiTaskIsoMix,
        task: str,
        num_classes: int,
        train_set: Dataset,
        val_set: Optional[Dataset] = None,
        mode: str = 'mixture',
        init_from: Optional[str] = None,
        **fit_kwargs,
) -> dict:
    """Add `task` to a trained model and train it with the bank frozen (or not, for mode='full').

    The new task's mixture logits and statistics start from `init_from`'s. In 'mixture' and 'full'
    mode its BatchNorm statistics follow the new data; in 'linear' mode they stay as copied.
    Returns {'top1', 'trainable', 'task_params', 'history'}.
    """
    model.add_task(task, num_classes, init_from=init_from)
    trainable = freeze_for_transfer(model, task, mode)
    history = fit_tasks(model, {task: train_set}, {task: val_set} if val_set is not None else None,
                        frozen_stats=mode == 'linear', **fit_kwargs)
    for p in model.parameters():
        p.requires_grad_(True)
    return {'top1': history[-1].get(f'{task}_top1'), 'trainable': count_params(trainable),
            'task_params': count_params(model.task_parameters(task)), 'history': history}


def batch_images(batch):
    """The images of a batch that may also hold labels."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


@torch.no_grad()
def reestimate_stats(model: MultiTaskIsoMix, task: str, dataset: Dataset, batch_size: int = 256,
                     device: Union[str, torch.device] = 'cpu') -> None:
    """Replace `task`'s BatchNorm statistics by their average over `dataset` (AdaBN); parameters untouched."""
    if len(dataset) == 0:
        raise ValueError(f'cannot re-estimate statistics of task {task!r}: the dataset is empty')
    path = model._path(task)
    norms = [m for m in path.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    model.eval()
    saved = []
    for m in norms:
        saved.append(m.momentum)
        m.reset_running_stats()
        m.train()
    for i, batch in enumerate(DataLoader(dataset, batch_size=batch_size)):
        for m in norms:  # momentum 1/(i+1): the running statistics become the average over all batches
            m.momentum = 1. / (i + 1)
        model(batch_images(batch).to(device), task=task)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.train(was_training)
