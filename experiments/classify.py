"""One image classifier trained on in-memory data: the run function of the single-task studies.

The data are a seeded subset of a shared dataset held as tensors (cached under the state folder), so
epochs cost only the model's compute; the subset is the same for every seed (seeds vary the model's
initialisation and the data order). Training: AdamW, cosine schedule with warm-up, label smoothing,
random crop (4 px padding) and, for natural images, horizontal flip; the mixture logits in their own
group (`mixture_lr_mult`, no weight decay). Each epoch records train loss and accuracy, val top-1 and how
the mixtures moved (mixture_stats.py), and saves the run's state, so a killed run resumes where it was.
The result is the last epoch's val top-1: nothing is selected on the validation data. Runs use CUDA when
it is available (`$ISOMIX_DEVICE` overrides), else the CPU.
"""
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from timm_isomix import models  # noqa: F401  (registers the isomix models)
from timm_isomix.tasks.data import load_task_data
from timm_isomix.tools.summary import count_macs
from timm_isomix.train.datasets import prepare_dataset
from timm_isomix.train.optim import mixture_param_groups
from .mixture_stats import alphas_of, mixture_stats
from .runner import RunState, Scale, state_root

__all__ = ['DEFAULTS', 'run_device', 'task_tensors', 'build_model', 'train_classifier', 'fit', 'evaluate']

DEFAULTS: Dict[str, Any] = dict(
    model='isomix_iso_64_8_p2', model_kwargs={}, data='cifar10', img_size=32, flip=True,
    opt='adamw', lr=3e-3, weight_decay=0.05, mixture_lr_mult=1.0, warmup_epochs=1, smoothing=0.1,
)
DATA_SEED = 0  # the training subset is the same for every run seed


def run_device() -> torch.device:
    return torch.device(os.environ.get('ISOMIX_DEVICE') or ('cuda' if torch.cuda.is_available() else 'cpu'))


def task_tensors(data: str, img_size: int, train_limit: Optional[int], val_limit: Optional[int]):
    """(train, val, num_classes): TensorDatasets of a shared dataset in [-1, 1], cached on disk."""
    root = prepare_dataset(data)
    num_classes = len([d for d in (root / 'train').iterdir() if d.is_dir()])
    out = []
    for split, limit in (('train', train_limit), ('val', val_limit)):
        cache = state_root() / 'cache' / f'{Path(data).name}-{split}-{img_size}-{limit or "all"}-{DATA_SEED}.pt'
        if cache.is_file():
            xs, ys = torch.load(cache, weights_only=True)
        else:
            ds = load_task_data(root, split, num_classes, img_size, limit, DATA_SEED, data)
            xs, ys = ds.tensors
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save((xs, ys), cache)
        out.append(torch.utils.data.TensorDataset(xs, ys))
    return out[0], out[1], num_classes


def build_model(config: Dict[str, Any], num_classes: int, scale: Scale) -> nn.Module:
    kwargs = dict(config.get('model_kwargs') or {})
    if scale.width_mult != 1.0:
        if 'width' not in kwargs:
            raise ValueError(f'--width-mult needs model_kwargs["width"] in the configuration, got {kwargs}')
        kwargs['width'] = int(round(kwargs['width'] * scale.width_mult))
    return timm.create_model(config['model'], num_classes=num_classes, **kwargs)


def _augment(x: torch.Tensor, g: torch.Generator, flip: bool) -> torch.Tensor:
    """Random crop of the image padded by 4 px (reflection), and a horizontal flip with probability 1/2."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode='reflect')
    dy, dx = torch.randint(0, 9, (n,), generator=g), torch.randint(0, 9, (n,), generator=g)
    x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if flip:
        mask = torch.rand(n, generator=g) < 0.5
        x[mask] = x[mask].flip(-1)
    return x


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int = 256) -> float:
    model.eval()
    xs, ys = dataset.tensors
    device = next(model.parameters()).device
    correct = sum((model(xs[i:i + batch_size].to(device)).argmax(-1).cpu() == ys[i:i + batch_size]).sum().item()
                  for i in range(0, len(ys), batch_size))
    return 100. * correct / max(len(ys), 1)


def _optimizer(model: nn.Module, cfg: Dict[str, Any], epochs: int, steps: int):
    groups = mixture_param_groups(model, cfg['weight_decay'], cfg['lr'], cfg['mixture_lr_mult'])
    optimizer = create_optimizer_v2(groups, opt=cfg['opt'], lr=cfg['lr'], weight_decay=cfg['weight_decay'])
    scheduler, _ = create_scheduler_v2(
        optimizer, sched='cosine', num_epochs=epochs, warmup_epochs=min(cfg['warmup_epochs'], max(epochs - 1, 0)),
        warmup_lr=cfg['lr'] * 0.01, min_lr=cfg['lr'] * 0.01, step_on_epochs=False, updates_per_epoch=steps)
    return optimizer, scheduler


def _train_epoch(model, optimizer, scheduler, train, cfg, batch_size: int, epoch: int, seed: int) -> Tuple[float, float]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    torch.manual_seed(seed * 1000 + epoch)  # drop-path and any other randomness of the model
    xs, ys = train.tensors
    steps = len(ys) // batch_size
    perm = torch.randperm(len(ys), generator=g)
    model.train()
    device = next(model.parameters()).device
    loss_sum = correct = seen = 0.
    for step in range(steps):
        idx = perm[step * batch_size:(step + 1) * batch_size]
        x, y = _augment(xs[idx], g, cfg['flip']).to(device), ys[idx].to(device)
        out = model(x)
        loss = F.cross_entropy(out, y, label_smoothing=cfg['smoothing'])
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f'loss is {loss.item()} at epoch {epoch} step {step}: lower lr')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(epoch * steps + step + 1)
        loss_sum += loss.item() * len(y)
        correct += (out.argmax(-1) == y).sum().item()
        seen += len(y)
    scheduler.step(epoch + 1)
    return loss_sum / max(seen, 1), 100. * correct / max(seen, 1)


def fit(model: nn.Module, train, val, cfg: Dict[str, Any], epochs: int, batch_size: int, seed: int,
        state: Optional[RunState] = None, tag: str = 'fit') -> Dict[str, Any]:
    """Train `model` for `epochs` (resuming from `state` if it holds this phase); return history and alphas."""
    steps = len(train.tensors[1]) // batch_size
    if steps == 0:
        raise ValueError(f'{len(train.tensors[1])} training images give no batch of {batch_size}')
    model.to(run_device())
    optimizer, scheduler = _optimizer(model, cfg, epochs, steps)
    start_alphas, history, start_epoch = alphas_of(model), [], 0
    saved = state.load() if state is not None else None
    if saved is not None and saved.get('phase') == tag:
        model.load_state_dict(saved['model'])
        optimizer.load_state_dict(saved['optimizer'])
        scheduler.load_state_dict(saved['scheduler'])
        start_alphas, history, start_epoch = saved['start_alphas'], saved['history'], saved['epoch'] + 1
    for epoch in range(start_epoch, epochs):
        t = time.time()
        loss, train_top1 = _train_epoch(model, optimizer, scheduler, train, cfg, batch_size, epoch, seed)
        record = {'epoch': epoch + 1, 'train_loss': loss, 'train_top1': train_top1, 'top1': evaluate(model, val),
                  'time': time.time() - t, **mixture_stats(alphas_of(model), start_alphas)}
        history.append(record)
        if state is not None:
            state.save({'phase': tag, 'epoch': epoch, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                        'scheduler': scheduler.state_dict(), 'start_alphas': start_alphas, 'history': history,
                        'extra': (saved or {}).get('extra', {})})
    return {'history': history, 'start_alphas': start_alphas, 'alphas': alphas_of(model)}


def train_classifier(config: Dict[str, Any], seed: int, scale: Scale, state: RunState) -> Dict[str, Any]:
    """The run function of single-task studies: train `config['model']` on `config['data']` at `scale`."""
    cfg = {**DEFAULTS, **config}
    train, val, num_classes = task_tensors(cfg['data'], cfg['img_size'], scale.train_limit, scale.val_limit)
    torch.manual_seed(seed)
    model = build_model(cfg, num_classes, scale)
    out = fit(model, train, val, cfg, scale.epochs, scale.batch_size, seed, state)
    history = out['history']
    return {
        'top1': history[-1]['top1'], 'params': sum(p.numel() for p in model.parameters()),
        'macs': count_macs(model.cpu(), (3, cfg['img_size'], cfg['img_size'])),
        'train_time': sum(h['time'] for h in history), 'train_images': len(train.tensors[1]),
        'val_images': len(val.tensors[1]), 'alphas': out['alphas'], 'start_alphas': out['start_alphas'],
        **{k: history[-1][k] for k in ('entropy', 'moved', 'changed', 'diversity') if k in history[-1]},
        'history': history,
    }
