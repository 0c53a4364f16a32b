"""One image classifier trained on in-memory data: the run function of the single-task studies.

The data are a seeded subset of a shared dataset held as tensors (cached under the state folder), so
epochs cost only the model's compute; the subset is the same for every seed (seeds vary the model's
initialisation and the data order). Training is the library's in-memory loop (`timm_isomix.tasks.fit.fit`,
one seeded permutation of the data per epoch): AdamW, cosine schedule with warm-up, label smoothing, random
crop (4 px padding) and, for natural images, horizontal flip; the mixture logits in their own group
(`mixture_lr_mult`, no weight decay). Each epoch records train loss and accuracy, val top-1 and how the
mixtures moved (mixture_stats.py), and saves the run's state, so a killed run resumes where it was. The
result is the last epoch's val top-1: nothing is selected on the validation data. Runs use CUDA when it is
available (`$ISOMIX_DEVICE` overrides), else the CPU.
"""
from pathlib import Path
from typing import Any, Dict, Optional

import timm
import torch
import torch.nn as nn

from timm_isomix import models  # noqa: F401  (registers the isomix models)
from timm_isomix.tasks import fit as loop
from timm_isomix.tasks.data import load_task_data
from timm_isomix.tools.summary import count_macs
from timm_isomix.train.datasets import prepare_dataset
from .mixture_stats import alphas_of, mixture_stats
from .runner import RunState, Scale, state_root

__all__ = ['DEFAULTS', 'run_device', 'task_tensors', 'build_model', 'train_classifier', 'fit', 'evaluate']

DEFAULTS: Dict[str, Any] = dict(
    model='isomix_iso_64_8_p2', model_kwargs={}, data='cifar10', img_size=32, flip=True,
    opt='adamw', lr=3e-3, weight_decay=0.05, mixture_lr_mult=1.0, warmup_epochs=1, smoothing=0.1,
)
DATA_SEED = 0  # the training subset is the same for every run seed
run_device = loop.default_device


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


def evaluate(model: nn.Module, dataset) -> float:
    """Top-1 (%) of a single-task model on `dataset`, where the model is."""
    return loop.evaluate(model, None, dataset)


def fit(model: nn.Module, train, val, cfg: Dict[str, Any], epochs: int, batch_size: int, seed: int,
        state: Optional[RunState] = None, tag: str = 'fit') -> Dict[str, Any]:
    """Train `model` for `epochs` with the recipe `cfg` (resuming from `state` if it holds this phase);
    return its history and the mixtures at the start and the end."""
    keep = {'start_alphas': alphas_of(model)}  # restored from the state when the run resumes
    history = loop.fit(
        model, train, val, epochs=epochs, batch_size=batch_size, seed=seed, lr=cfg['lr'], opt=cfg['opt'],
        weight_decay=cfg['weight_decay'], mixture_lr_mult=cfg['mixture_lr_mult'], warmup_epochs=cfg['warmup_epochs'],
        smoothing=cfg['smoothing'], augment='crop_flip' if cfg['flip'] else 'crop', state=state, tag=tag, keep=keep,
        epoch_metrics=lambda m: mixture_stats(alphas_of(m), keep['start_alphas']))
    return {'history': history, 'start_alphas': keep['start_alphas'], 'alphas': alphas_of(model)}


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
