"""The in-memory training loop: one task or several over one model, data held as tensors, timm's optimizer and
scheduler. The task tools (train.py --tasks, transfer, routed models) and the studies' single-task runs train
through it.

    history = fit(model, train, val, epochs=4, lr=3e-3, augment='crop_flip', smoothing=0.1)     # model(x)
    history = fit_tasks(model, {'a': train_a, 'b': train_b}, {'a': val_a, 'b': val_b})         # model(x, task=t)

- Optimizer: timm's `create_optimizer_v2` over `mixture_param_groups` (the mixture logits at
  `lr * mixture_lr_mult` without weight decay; a router at `router_lr`; with `patch_lr_mult`, the tasks'
  patches at `lr * patch_lr_mult`). Only parameters that require grad train.
- Schedule: timm's cosine schedule (`create_scheduler_v2`) stepped at every update, from `lr / 100` through
  `warmup_epochs` of warm-up (at most `epochs - 1`) to `lr`, down to `lr / 100`.
- Loss: cross-entropy (label smoothing `smoothing`), plus a routed model's routing loss (its router learns).
- Batches (`sampling`):
  'cycle' (fit_tasks): every step takes one batch of every task from its shuffled loader, each loader
  cycling through its data, all drawing from one generator seeded by `seed`; an epoch has as many steps as
  the mean task has batches, or `steps_per_epoch` (a budget: small tasks cycle, large ones are subsampled),
  so every task weighs the same whatever its size. Under DDP each task has a DistributedSampler.
  'permutation' (fit; one task): each epoch is one pass over a permutation drawn from a generator seeded by
  `seed * 1000 + epoch` (the last partial batch dropped); torch's global RNG is seeded the same way, so each
  epoch is reproducible by itself.
- Augmentation (`augment`): 'crop' (a random crop of the image padded by 4 px by reflection) or 'crop_flip'
  (and a horizontal flip with probability 1/2), drawn from the batches' generator.
- Resuming: `state` is any object with `load()` (a dict, or None) and `save(dict)`; after every epoch the
  loop saves model, optimizer, scheduler, history, torch's RNG and the caller's `keep` values. Started again
  with the same arguments, it goes on from the last finished epoch along the path an unstopped run takes.
- Device: `device`, by default `default_device()` (CUDA when available; `$ISOMIX_DEVICE` overrides); the model
  is moved there. Evaluation runs where the model is, in float32.
- Precision: `amp='bfloat16'` autocasts the training steps' forward passes to bfloat16 (no loss scaling is
  needed); `channels_last` moves the model and the batches to that memory format. By default both follow
  `$ISOMIX_AMP` and `$ISOMIX_CHANNELS_LAST` ('1'), unset: float32 and the contiguous format.
"""
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from ..train.optim import mixture_param_groups

__all__ = ['fit', 'fit_tasks', 'evaluate', 'default_device', 'default_precision', 'model_device', 'random_crop_flip',
           'AUGMENTATIONS', 'SAMPLINGS']

AUGMENTATIONS = (None, 'crop', 'crop_flip')
SAMPLINGS = ('cycle', 'permutation')
Task = Optional[str]  # None: the model's only task, run as model(x), its metrics without a task prefix


def default_device() -> torch.device:
    """Where runs train: `$ISOMIX_DEVICE` when set (e.g. 'cpu', 'cuda:1'), else CUDA when available, else the CPU."""
    return torch.device(os.environ.get('ISOMIX_DEVICE') or ('cuda' if torch.cuda.is_available() else 'cpu'))


def default_precision() -> Dict[str, Any]:
    """How runs compute when the caller does not say: {'amp': `$ISOMIX_AMP` or None, 'channels_last':
    `$ISOMIX_CHANNELS_LAST` == '1'}."""
    return {'amp': os.environ.get('ISOMIX_AMP') or None, 'channels_last': os.environ.get('ISOMIX_CHANNELS_LAST') == '1'}


def _amp_dtype(amp: Optional[str]) -> Optional[torch.dtype]:
    if amp not in (None, 'bfloat16'):
        raise ValueError(f"amp must be None or 'bfloat16' (float16 would need loss scaling), got {amp!r}")
    return torch.bfloat16 if amp else None


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (the CPU for a model without any)."""
    return next(iter(model.parameters()), torch.empty(0)).device


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Each image (N, C, H, W) cropped at random from itself padded by 4 px (reflection), and with `flip`
    mirrored horizontally with probability 1/2; the draws come from `generator`."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode='reflect')
    dy, dx = torch.randint(0, 9, (n,), generator=generator), torch.randint(0, 9, (n,), generator=generator)
    x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        x[mask] = x[mask].flip(-1)
    return x


def _run(model: nn.Module, x: torch.Tensor, task: Task) -> torch.Tensor:
    return model(x) if task is None else model(x, task=task)


def _key(task: Task, name: str) -> str:
    return name if task is None else f'{task}_{name}'


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, dataset: Dataset, batch_size: int = 256,
             device: Optional[Union[str, torch.device]] = None) -> float:
    """Top-1 accuracy (%) of `task` (None: a single-task model) on `dataset`, in eval mode; the data go to
    `device`, by default the model's."""
    device = model_device(model) if device is None else device
    was_training = model.training
    model.eval()
    correct = n = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        correct += (_run(model, x.to(device), task).argmax(-1).cpu() == y).sum().item()
        n += len(y)
    model.train(was_training)
    return 100. * correct / max(n, 1)


class _Step(nn.Module):
    """One forward over a batch of every task, so DDP sees one forward per backward."""

    def __init__(self, model: nn.Module, smoothing: float):
        super().__init__()
        self.model, self.smoothing = model, smoothing

    def forward(self, batches: Dict[Task, Tuple[torch.Tensor, torch.Tensor]]):
        losses, correct, extra = {}, {}, 0.
        for task, (x, y) in batches.items():
            out = _run(self.model, x, task)
            losses[task] = F.cross_entropy(out, y, label_smoothing=self.smoothing)
            correct[task] = (out.argmax(-1) == y).sum()
            if hasattr(self.model, 'routing_loss'):  # a routed model (models/routed_multitask.py): its router learns
                extra = extra + self.model.routing_loss(out, y)
        return sum(losses.values()) + extra, losses, correct


def _cycle(loader: DataLoader):
    epoch = 0
    while True:
        if hasattr(loader.sampler, 'set_epoch'):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _crop(augment: Optional[str], x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x if augment is None else random_crop_flip(x, generator, flip=augment == 'crop_flip')


class _CycleBatches:
    """'cycle' sampling: one batch of every task per step from shuffled, cycling loaders."""

    def __init__(self, train_sets: Dict[Task, Dataset], batch_size: int, seed: int, distributed: bool,
                 augment: Optional[str], steps_per_epoch: Optional[int]):
        self.g, self.augment = torch.Generator().manual_seed(seed), augment
        loaders = {}
        for task, ds in train_sets.items():
            if distributed:
                loaders[task] = DataLoader(ds, batch_size=batch_size, sampler=DistributedSampler(ds, seed=seed),
                                           drop_last=True)
            else:
                loaders[task] = DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=len(ds) > batch_size,
                                           generator=self.g)
        self.steps = steps_per_epoch or max(1, round(sum(len(l) for l in loaders.values()) / len(loaders)))
        self.iters = {t: _cycle(l) for t, l in loaders.items()}

    def start_epoch(self, epoch: int) -> None:
        pass

    def next(self) -> Dict[Task, Tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for task, it in self.iters.items():
            x, y = next(it)
            out[task] = (_crop(self.augment, x, self.g), y)
        return out

    def skip(self, epochs: int) -> None:
        """Draw (and drop) the batches of `epochs` finished epochs, so that a resumed run draws what comes next."""
        for _ in range(epochs * self.steps):
            self.next()


class _PermutationBatches:
    """'permutation' sampling: each epoch one pass over a fresh seeded permutation of the only task's data."""

    def __init__(self, train_sets: Dict[Task, Dataset], batch_size: int, seed: int, augment: Optional[str]):
        if len(train_sets) != 1:
            raise ValueError(f"sampling='permutation' trains one task, got {len(train_sets)}: use sampling='cycle'")
        (self.task, ds), = train_sets.items()
        self.xs, self.ys = _tensors(ds)
        self.batch_size, self.seed, self.augment = batch_size, seed, augment
        self.steps = len(self.ys) // batch_size
        if self.steps == 0:
            raise ValueError(f'{len(self.ys)} training images give no batch of {batch_size}')

    def start_epoch(self, epoch: int) -> None:
        self.g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        torch.manual_seed(self.seed * 1000 + epoch)  # drop path and any other randomness of the model
        self.perm, self.step = torch.randperm(len(self.ys), generator=self.g), 0

    def next(self) -> Dict[Task, Tuple[torch.Tensor, torch.Tensor]]:
        idx = self.perm[self.step * self.batch_size:(self.step + 1) * self.batch_size]
        self.step += 1
        return {self.task: (_crop(self.augment, self.xs[idx], self.g), self.ys[idx])}

    def skip(self, epochs: int) -> None:
        pass  # every epoch draws from its own seed


def _tensors(ds: Dataset) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(ds, TensorDataset):
        return ds.tensors[0], ds.tensors[1]
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in items]), torch.as_tensor([y for _, y in items])


def _optimizer(model: nn.Module, epochs: int, steps: int, lr: float, opt: str, weight_decay: float,
               mixture_lr_mult: float, warmup_epochs: int, router_lr: Optional[float],
               patch_lr_mult: Optional[float]):
    groups = mixture_param_groups(model, weight_decay, lr, mixture_lr_mult, router_lr=router_lr,
                                  patch_lr_mult=patch_lr_mult)
    if not groups:
        raise ValueError('nothing to train: no parameter requires grad')
    optimizer = create_optimizer_v2(groups, opt=opt, lr=lr, weight_decay=weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched='cosine', num_epochs=epochs, warmup_epochs=min(warmup_epochs, max(epochs - 1, 0)),
        warmup_lr=lr * 0.01, min_lr=lr * 0.01, step_on_epochs=False, updates_per_epoch=steps)
    return optimizer, scheduler


def _check_tasks(model: nn.Module, train_sets: Dict[Task, Dataset]) -> None:
    if not train_sets:
        raise ValueError('fit_tasks needs at least one task with training data')
    for task in train_sets:
        if task is not None and hasattr(model, '_path'):
            model._path(task)  # a multi-task model names the task it lacks
    empty = [t for t, ds in train_sets.items() if len(ds) == 0]
    if empty:
        raise ValueError(f'tasks {empty} have no training data')


def _train_epoch(step_module, model: nn.Module, batches, optimizer, scheduler, epoch: int, epochs: int,
                 device, frozen_stats: bool, amp_dtype: Optional[torch.dtype] = None,
                 memory_format: torch.memory_format = torch.contiguous_format) -> Dict[str, float]:
    model.train()
    if frozen_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    batches.start_epoch(epoch)
    steps = batches.steps
    tot_loss, tot_correct, tot_n = {}, {}, {}
    for step in range(steps):
        if hasattr(model, 'set_progress'):  # a routed model's Gumbel temperature schedule
            model.set_progress((epoch + step / steps) / epochs)
        batch = {t: (x.to(device, memory_format=memory_format if x.dim() == 4 else torch.preserve_format), y.to(device))
                 for t, (x, y) in batches.next().items()}
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss, losses, correct = step_module(batch)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f'loss is {loss.item()} at epoch {epoch} step {step}: lower lr')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(epoch * steps + step + 1)
        for t in losses:
            n = len(batch[t][1])
            tot_loss[t] = tot_loss.get(t, 0.) + losses[t].item() * n
            tot_correct[t] = tot_correct.get(t, 0) + correct[t].item()
            tot_n[t] = tot_n.get(t, 0) + n
    scheduler.step(epoch + 1)
    metrics = {}
    for t in tot_n:
        metrics[_key(t, 'train_loss')] = tot_loss[t] / tot_n[t]
        metrics[_key(t, 'train_top1')] = 100. * tot_correct[t] / tot_n[t]
    return metrics


def _resume(state, tag: str, model, optimizer, scheduler, batches, keep: Optional[Dict[str, Any]]):
    """(history, first epoch) of a run `state` holds for phase `tag`, its model and optimizer restored; else ([], 0)."""
    saved = state.load() if state is not None else None
    if saved is None or saved.get('phase') != tag:
        return [], 0
    model.load_state_dict(saved['model'])
    optimizer.load_state_dict(saved['optimizer'])
    scheduler.load_state_dict(saved['scheduler'])
    if keep is not None:
        keep.update({k: saved[k] for k in keep if k in saved})
    start = saved['epoch'] + 1
    batches.skip(start)
    if 'rng' in saved:
        torch.set_rng_state(saved['rng'])
    if 'cuda_rng' in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved['cuda_rng'])
    return saved['history'], start


def _save(state, tag: str, epoch: int, model, optimizer, scheduler, history, keep) -> None:
    rng = {'rng': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng['cuda_rng'] = torch.cuda.get_rng_state_all()
    state.save({'phase': tag, 'epoch': epoch, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                'scheduler': scheduler.state_dict(), 'history': history, **rng, **(keep or {})})


def fit_tasks(
        model: nn.Module,
        train_sets: Dict[Task, Dataset],
        val_sets: Optional[Dict[Task, Dataset]] = None,
        epochs: int = 3,
        lr: float = 2e-3,
        batch_size: int = 64,
        opt: str = 'adamw',
        weight_decay: float = 0.05,
        mixture_lr_mult: float = 10.,
        warmup_epochs: int = 0,
        frozen_stats: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        seed: int = 0,
        distributed: bool = False,
        log_fn: Optional[Callable[[Dict[str, Any]], None]] = None,
        router_lr: Optional[float] = None,
        steps_per_epoch: Optional[int] = None,
        patch_lr_mult: Optional[float] = None,
        smoothing: float = 0.,
        augment: Optional[str] = None,
        sampling: str = 'cycle',
        state=None,
        tag: str = 'fit',
        keep: Optional[Dict[str, Any]] = None,
        epoch_metrics: Optional[Callable[[nn.Module], Dict[str, Any]]] = None,
        amp: Optional[str] = None,
        channels_last: Optional[bool] = None,
) -> List[dict]:
    """Train the tasks of `train_sets` (task -> dataset; the task None: a single-task model) jointly; see the
    module docstring for the recipe, sampling, augmentation, resuming, device and precision.

    With `frozen_stats`, BatchNorm statistics stay as they are (eval mode), e.g. for a linear probe. Freeze
    what must not train first (transfer.freeze_for_transfer). `state` and `tag` resume an interrupted run
    (`tag` names the phase, so one state can serve a run of several phases); `keep` holds values saved with
    the state and restored from it (e.g. a run's starting mixtures); `epoch_metrics(model)` adds to each
    epoch's record. Returns one record per epoch: 'epoch', per task '<task>_train_loss', '<task>_train_top1'
    and '<task>_top1' on `val_sets` ('train_loss', 'train_top1', 'top1' for the task None), 'time' (seconds),
    and `epoch_metrics`' keys. `log_fn(record)` sees each record as it is made.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f'augment must be one of {list(AUGMENTATIONS)}, got {augment!r}')
    if sampling not in SAMPLINGS:
        raise ValueError(f'sampling must be one of {list(SAMPLINGS)}, got {sampling!r}')
    if sampling == 'permutation' and (distributed or steps_per_epoch):
        raise ValueError("sampling='permutation' is one pass per epoch in one process: "
                         "distributed and steps_per_epoch need sampling='cycle'")
    if state is not None and distributed:
        raise ValueError('state (resuming) is for a run in one process, not a distributed one')
    _check_tasks(model, train_sets)
    device = default_device() if device is None else torch.device(device)
    precision = default_precision()
    amp_dtype = _amp_dtype(precision['amp'] if amp is None else amp)
    memory_format = torch.channels_last if (precision['channels_last'] if channels_last is None else channels_last) \
        else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    if sampling == 'cycle':
        batches = _CycleBatches(train_sets, batch_size, seed, distributed, augment, steps_per_epoch)
    else:
        batches = _PermutationBatches(train_sets, batch_size, seed, augment)
    optimizer, scheduler = _optimizer(model, epochs, batches.steps, lr, opt, weight_decay, mixture_lr_mult,
                                      warmup_epochs, router_lr, patch_lr_mult)
    step_module = _Step(model, smoothing)
    if distributed:
        step_module = nn.parallel.DistributedDataParallel(step_module)
    history, start = _resume(state, tag, model, optimizer, scheduler, batches, keep)
    for epoch in range(start, epochs):
        began = time.time()
        record = {'epoch': epoch + 1, **_train_epoch(step_module, model, batches, optimizer, scheduler, epoch,
                                                    epochs, device, frozen_stats, amp_dtype, memory_format)}
        for t, ds in (val_sets or {}).items():
            record[_key(t, 'top1')] = evaluate(model, t, ds, device=device)
        record['time'] = time.time() - began
        record.update(epoch_metrics(model) if epoch_metrics is not None else {})
        history.append(record)
        if state is not None:
            _save(state, tag, epoch, model, optimizer, scheduler, history, keep)
        if log_fn is not None:
            log_fn(record)
    return history


def fit(model: nn.Module, train: Dataset, val: Optional[Dataset] = None, **kwargs) -> List[dict]:
    """Train a single-task model (`model(x)`) on `train`: `fit_tasks` with one task, by default one pass over a
    fresh seeded permutation per epoch (`sampling='permutation'`). Records: 'epoch', 'train_loss',
    'train_top1', 'top1' (on `val`), 'time', and `epoch_metrics`' keys."""
    kwargs.setdefault('sampling', 'permutation')
    return fit_tasks(model, {None: train}, None if val is None else {None: val}, **kwargs)
