"""Joint training of the tasks of a `MultiTaskIsoMix`: every step takes one batch of every task."""
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from ..models.multitask import MultiTaskIsoMix
from ..train.optim import mixture_param_groups

__all__ = ['fit_tasks', 'evaluate']


class _JointStep(nn.Module):
    """One forward over a batch of every task, so DDP sees one forward per backward."""

    def __init__(self, model: MultiTaskIsoMix):
        super().__init__()
        self.model = model

    def forward(self, batches: Dict[str, Tuple[torch.Tensor, torch.Tensor]]):
        losses, correct, extra = {}, {}, 0.
        for task, (x, y) in batches.items():
            out = self.model(x, task=task)
            losses[task] = F.cross_entropy(out, y)
            correct[task] = (out.argmax(-1) == y).sum()
            if hasattr(self.model, 'routing_loss'):  # a routed model (models/routed_multitask.py): its router learns here
                extra = extra + self.model.routing_loss(out, y)
        return sum(losses.values()) + extra, losses, correct


@torch.no_grad()
def evaluate(model: MultiTaskIsoMix, task: str, dataset: Dataset, batch_size: int = 256,
             device: Union[str, torch.device] = 'cpu') -> float:
    """Top-1 accuracy (%) of `task` on `dataset`."""
    was_training = model.training
    model.eval()
    correct = n = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        correct += (model(x, task=task).argmax(-1) == y).sum().item()
        n += len(y)
    model.train(was_training)
    return 100. * correct / max(n, 1)


def _cycle(loader: DataLoader):
    epoch = 0
    while True:
        if hasattr(loader.sampler, 'set_epoch'):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _loaders(train_sets: Dict[str, Dataset], batch_size: int, seed: int, distributed: bool) -> Dict[str, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    loaders = {}
    for task, ds in train_sets.items():
        if distributed:
            loaders[task] = DataLoader(ds, batch_size=batch_size, sampler=DistributedSampler(ds, seed=seed),
                                       drop_last=True)
        else:
            loaders[task] = DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=len(ds) > batch_size,
                                       generator=g)
    return loaders


def fit_tasks(
        model: MultiTaskIsoMix,
        train_sets: Dict[str, Dataset],
        val_sets: Optional[Dict[str, Dataset]] = None,
        epochs: int = 3,
        lr: float = 2e-3,
        batch_size: int = 64,
        opt: str = 'adamw',
        weight_decay: float = 0.05,
        mixture_lr_mult: float = 10.,
        warmup_epochs: int = 0,
        frozen_stats: bool = False,
        device: Union[str, torch.device] = 'cpu',
        seed: int = 0,
        distributed: bool = False,
        log_fn=None,
        router_lr: Optional[float] = None,
        steps_per_epoch: Optional[int] = None,
        patch_lr_mult: Optional[float] = None,
) -> List[dict]:
    """Train tasks jointly with balanced task sampling: every step takes one batch of every task.

    An epoch has as many steps as the mean task has batches (or `steps_per_epoch`, a compute budget that
    leaves every task its whole training set to draw from; small tasks cycle, large ones are
    subsampled), so each task weighs the same whatever its size. The parameters requiring grad
    are trained (freeze the others first, as transfer.freeze_for_transfer does); with `frozen_stats`, BatchNorm statistics stay as they are
    (eval mode), e.g. for a linear probe. Returns per-epoch metrics: train loss/accuracy and val
    top-1 per task. A routed model's router (models/routed_multitask.py) trains at `router_lr` (default `lr`); the
    tasks' patches (own BatchNorm scale and shift) at `lr * patch_lr_mult` (default `lr`).
    """
    for task in train_sets:
        model._path(task)
    if not train_sets:
        raise ValueError('fit_tasks needs at least one task with training data')
    empty = [t for t, ds in train_sets.items() if len(ds) == 0]
    if empty:
        raise ValueError(f'tasks {empty} have no training data')
    groups = mixture_param_groups(model, weight_decay, lr, mixture_lr_mult, router_lr=router_lr,
                                  patch_lr_mult=patch_lr_mult)
    if not groups:
        raise ValueError('nothing to train: no parameter requires grad')
    optimizer = create_optimizer_v2(groups, opt=opt, lr=lr, weight_decay=weight_decay)
    loaders = _loaders(train_sets, batch_size, seed, distributed)
    steps = steps_per_epoch or max(1, round(sum(len(l) for l in loaders.values()) / len(loaders)))
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=epochs, warmup_epochs=warmup_epochs,
                                       warmup_lr=lr * 0.01, min_lr=lr * 0.01, step_on_epochs=False,
                                       updates_per_epoch=steps)
    step_module = _JointStep(model)
    if distributed:
        step_module = nn.parallel.DistributedDataParallel(step_module)
    iters = {t: _cycle(l) for t, l in loaders.items()}
    history = []
    for epoch in range(epochs):
        model.train()
        if frozen_stats:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        tot_loss = {t: 0. for t in loaders}
        tot_correct = {t: 0 for t in loaders}
        tot_n = {t: 0 for t in loaders}
        for step in range(steps):
            if hasattr(model, 'set_progress'):  # a routed model's Gumbel temperature schedule
                model.set_progress((epoch + step / steps) / epochs)
            batches = {t: tuple(v.to(device) for v in next(it)) for t, it in iters.items()}
            loss, losses, correct = step_module(batches)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step_update(epoch * steps + step + 1)
            for t in losses:
                tot_loss[t] += losses[t].item() * len(batches[t][1])
                tot_correct[t] += correct[t].item()
                tot_n[t] += len(batches[t][1])
        scheduler.step(epoch + 1)
        metrics = {'epoch': epoch + 1}
        for t in loaders:
            metrics[f'{t}_train_loss'] = tot_loss[t] / tot_n[t]
            metrics[f'{t}_train_top1'] = 100. * tot_correct[t] / tot_n[t]
        for t, ds in (val_sets or {}).items():
            metrics[f'{t}_top1'] = evaluate(model, t, ds, device=device)
        history.append(metrics)
        if log_fn is not None:
            log_fn(metrics)
    return history
