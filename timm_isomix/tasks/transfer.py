"""Transfer to a new task over a trained bank, with controls that separate the mixture from the statistics.

A new task is added to a trained `MultiTaskIsoMix` (its mixture logits and statistics start from
`init_from`'s) and trained on its data in one of the modes of `TRANSFER_MODES`. Each mode states what
learns (the task's mixture logits, its BatchNorm scale and shift = the "model patch" of Mudrakarta et al.,
ICLR 2019, its head, or the whole trunk) and what becomes of the BatchNorm statistics:

  'frozen'      the source task's statistics, unchanged (BatchNorm in eval mode while training);
  'reestimate'  re-estimated on the new task's training images before training (AdaBN), following
                the data while training when the trunk's computation changes, and re-estimated once
                more at the end (so they are the exact averages of the final network's activations).

The head starts from `init_from`'s when the class counts match (digit domains), else fresh. The
'stats' mode trains nothing: it is the source's network and head with re-estimated statistics.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..models.multitask import MultiTaskIsoMix, count_params
from .fit import default_device, evaluate, fit_tasks, model_device

__all__ = ['TransferMode', 'TRANSFER_MODES', 'freeze_for_transfer', 'transfer', 'reestimate_stats', 'batch_images']


@dataclass(frozen=True)
class TransferMode:
    """What learns in a transfer, and what the statistics are."""
    mixture: bool = False   # the task's own mixture logits
    patch: bool = False     # the task's own BatchNorm scale and shift (stem and layers)
    head: bool = False
    trunk: bool = False     # stem and bank (full fine-tuning)
    stats: str = 'reestimate'

    @property
    def learns(self) -> bool:
        return self.mixture or self.patch or self.head or self.trunk


TRANSFER_MODES: Dict[str, TransferMode] = {
    'mixture_frozen_stats': TransferMode(mixture=True, head=True, stats='frozen'),
    'mixture': TransferMode(mixture=True, head=True),
    'stats': TransferMode(),
    'linear': TransferMode(head=True),
    'patch': TransferMode(patch=True, head=True),
    'mixture_patch': TransferMode(mixture=True, patch=True, head=True),
    'full': TransferMode(mixture=True, head=True, trunk=True),
}


def _mode(mode: str) -> TransferMode:
    if mode not in TRANSFER_MODES:
        raise ValueError(f'unknown transfer mode {mode!r}; expected one of {tuple(TRANSFER_MODES)}')
    return TRANSFER_MODES[mode]


def freeze_for_transfer(model: MultiTaskIsoMix, task: str, mode: str = 'mixture') -> List[nn.Parameter]:
    """Set requires_grad for training `task` alone in `mode` and return the trainable parameters.

    Only `task`'s own parameters (its mixture logits, patch, head) and, for 'full', the stem, unbanked blocks
    and banks it runs can learn; everything else (other tasks, the shared mixture) is frozen.
    """
    m = _mode(mode)
    path = model._path(task)
    trainable = []
    if m.mixture:
        trainable += path.mixture_logits(model.shared_mixture)
    if m.patch:
        if not path.has_patch:
            raise ValueError(f'mode {mode!r} trains the BatchNorm patch, but task {task!r} has none '
                             f'(add it with add_task(..., patch=True))')
        trainable += path.patch_parameters()
    if m.head:
        trainable += list(path.head.parameters())
    if m.trunk:
        trainable += model.trunk_parameters(task)
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
        device: Optional[Union[str, torch.device]] = None,
        **fit_kwargs,
) -> dict:
    """Add `task` to a trained model and train it in `mode` (see the module docstring), on `device` (default:
    `fit.default_device()`, CUDA when available), where the model is moved first.

    Returns {'mode', 'top1' (on `val_set`, None without), 'trainable' (parameters that learned),
    'task_params' (parameters only this task uses), 'history' (per-epoch metrics, [] for 'stats')}.
    """
    m = _mode(mode)
    device = default_device() if device is None else torch.device(device)
    model.to(device)
    if init_from is None and (m.stats == 'frozen' or not m.learns):
        raise ValueError(f'mode {mode!r} runs a source task\'s statistics or head: name it with init_from')
    source_head = model._path(init_from).head if init_from is not None else None
    if not m.head and (source_head is None or source_head.out_features != num_classes):
        raise ValueError(f'mode {mode!r} trains no head, so it runs {init_from!r}\'s, which has '
                         f'{getattr(source_head, "out_features", None)} classes; task {task!r} has {num_classes}')
    path = model.add_task(task, num_classes, init_from=init_from, patch=m.patch)
    if source_head is not None and source_head.out_features == num_classes:
        path.head.load_state_dict(source_head.state_dict())
    if m.stats == 'reestimate':
        reestimate_stats(model, task, train_set, device=device)
    trainable = freeze_for_transfer(model, task, mode)
    history = []
    try:
        if m.learns:
            # Statistics follow the data while the network changes; a head alone changes no activation.
            frozen_stats = m.stats == 'frozen' or not (m.mixture or m.patch or m.trunk)
            history = fit_tasks(model, {task: train_set}, {task: val_set} if val_set is not None else None,
                                frozen_stats=frozen_stats, device=device, **fit_kwargs)
            if not frozen_stats:
                reestimate_stats(model, task, train_set, device=device)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    top1 = evaluate(model, task, val_set, device=device) if val_set is not None else None
    return {'mode': mode, 'top1': top1, 'trainable': count_params(trainable),
            'task_params': count_params(model.task_parameters(task)), 'history': history}


def batch_images(batch):
    """The images of a batch that may also hold labels."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


@torch.no_grad()
def reestimate_stats(model: MultiTaskIsoMix, task: str, dataset: Dataset, batch_size: int = 256,
                     device: Optional[Union[str, torch.device]] = None) -> None:
    """Replace `task`'s BatchNorm statistics by their average over `dataset` (AdaBN); parameters untouched.
    The images go to `device`, by default the model's."""
    device = model_device(model) if device is None else device
    if len(dataset) == 0:
        raise ValueError(f'cannot re-estimate statistics of task {task!r}: the dataset is empty')
    norms = model._path(task).norm_stats()
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
