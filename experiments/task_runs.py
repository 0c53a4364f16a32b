"""Run functions of the multi-task, transfer and adaptation studies (issue 13), on in-memory task data.

Each task's data is a split of a shared dataset (optionally some of its classes, or a seeded subset),
held as tensors and cached on disk as uint8 (exact: the images are 8-bit), the same for every seed.
Multi-task models train with the library's in-memory loop (`tasks.fit.fit_tasks`): one batch of every task
per step, an epoch as many steps as the mean task has batches, at most a configuration's `steps_per_epoch` (a
compute budget: each task still draws from its whole training set), AdamW with a cosine schedule, no
augmentation; every variant of a study takes the same steps. Models a study's configurations share (the bank
that transfer and adaptation start from) are trained once per seed and scale and kept under the state folder.
Runs use CUDA when it is available (`$ISOMIX_DEVICE` overrides, `tasks.fit.default_device`), else the CPU.
"""
import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import TensorDataset

from timm_isomix.models.multitask import MultiTaskIsoMix
from timm_isomix.tasks.data import load_task_data
from timm_isomix.tasks.fit import default_device, evaluate, fit_tasks
from timm_isomix.tasks.train_tasks import build_task_model
from timm_isomix.train.datasets import prepare_dataset
from timm_isomix.train.files import atomic_save
from timm_isomix.train.plots import js_sharing
from .runner import RunState, Scale, state_root

__all__ = ['DATA_SEED', 'TRAINING', 'training', 'task_data', 'model_config', 'train_model', 'shared_model',
           'alphas_and_sharing']

DATA_SEED = 0  # data subsets are the same for every run seed
# The training recipe of every multi-task model of these studies (fit_tasks' arguments).
TRAINING: Dict[str, Any] = dict(lr=3e-3, opt='adamw', weight_decay=0.05, mixture_lr_mult=10.)


def training(config: Dict[str, Any]) -> Dict[str, Any]:
    """fit_tasks' recipe arguments of a configuration: TRAINING with its own `training` overrides."""
    return {**TRAINING, **config.get('training', {})}


def _cache_name(data: str, split: str, classes, img_size: int, limit: Optional[int]) -> str:
    tag = str(classes) if isinstance(classes, int) else hashlib.sha1('|'.join(classes).encode()).hexdigest()[:10]
    return f'{Path(data).name}-{split}-c{tag}-{img_size}-{limit or "all"}-{DATA_SEED}.pt'


def task_data(spec: Dict[str, Any], split: str, img_size: int, limit: Optional[int]) -> TensorDataset:
    """One task's split as a TensorDataset in [-1, 1] (spec: {name, data, classes}), cached as uint8."""
    cache = state_root() / 'cache' / _cache_name(spec['data'], split, spec['classes'], img_size, limit)
    if cache.is_file():
        xs, ys = torch.load(cache, weights_only=True)
    else:
        ds = load_task_data(prepare_dataset(spec['data']), split, spec['classes'], img_size, limit, DATA_SEED,
                            spec['name'])
        xs, ys = ds.tensors
        xs = ((xs + 1) * 127.5).round().to(torch.uint8)  # ToTensor gave k / 255: this is k, exactly
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_save((xs, ys), str(cache))
    return TensorDataset(xs.float() / 127.5 - 1, ys)


def task_sets(tasks: Sequence[Dict[str, Any]], img_size: int, scale: Scale):
    train = {t['name']: task_data(t, 'train', img_size, t.get('train_limit', scale.train_limit)) for t in tasks}
    val = {t['name']: task_data(t, 'val', img_size, t.get('val_limit', scale.val_limit)) for t in tasks}
    return train, val


def model_config(config: Dict[str, Any], tasks: Sequence[Dict[str, Any]], scale: Scale) -> Dict[str, Any]:
    """The MultiTaskConfig mapping of a study configuration (model, model_kwargs, variant keys) and tasks."""
    kwargs = dict(config.get('model_kwargs') or {})
    if scale.width_mult != 1.0:
        kwargs['width'] = int(round(kwargs['width'] * scale.width_mult))
    keys = ('share_from', 'init_logit', 'mixture_init', 'hard_shared', 'patch', 'independent', 'share_head')
    return {'model': config['model'], 'model_kwargs': kwargs,
            'tasks': [{k: t[k] for k in ('name', 'data', 'classes')} for t in tasks],
            **{k: config[k] for k in keys if k in config}}


def train_model(config: Dict[str, Any], tasks: Sequence[Dict[str, Any]], seed: int, scale: Scale,
                epochs: Optional[int] = None, state: Optional[RunState] = None):
    """Build and jointly train the multi-task model of `config` on `tasks` (resuming from `state`, if given).

    Returns {'model', 'history' (per epoch, 'top1' = mean over tasks), 'seconds', 'train', 'val' (datasets)}.
    """
    img_size = config.get('img_size', 32)
    train, val = task_sets(tasks, img_size, scale)
    torch.manual_seed(seed)
    model = build_task_model(model_config(config, tasks, scale))
    start = time.time()
    steps = config.get('steps_per_epoch')
    if steps:  # a cap: smaller (--train-limit) sets keep their own, shorter epoch
        steps = min(steps, max(1, round(sum(max(1, len(ds) // scale.batch_size) for ds in train.values()) / len(train))))
    history = fit_tasks(model, train, val, epochs=epochs or scale.epochs, batch_size=scale.batch_size, seed=seed,
                        steps_per_epoch=steps, state=state, **training(config))
    for h in history:  # the runner's curves read 'top1': the mean over tasks
        h['top1'] = sum(h[f'{t}_top1'] for t in train) / len(train)
    return {'model': model, 'history': history, 'seconds': time.time() - start, 'train': train, 'val': val}


@contextlib.contextmanager
def _lock(path: Path, timeout: float = 3600.):
    """An exclusive lock file, so that parallel runs train a shared model once (stale after `timeout`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    while True:
        try:
            fd = os.open(str(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            break
        except FileExistsError:
            if time.time() - path.stat().st_mtime > timeout or time.time() - start > timeout:
                path.unlink(missing_ok=True)
            time.sleep(5.)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def shared_model(config: Dict[str, Any], tasks: Sequence[Dict[str, Any]], seed: int, scale: Scale):
    """The model of `config` trained on `tasks` for this seed and scale, trained once and then loaded (onto
    `default_device()`).

    Returns (model, info) with info = {'top1': per task, 'train_time', 'history'}.
    """
    key = json.dumps({'config': model_config(config, tasks, scale), 'training': config.get('training', {}),
                      'epochs': config.get('epochs') or scale.epochs, 'steps': config.get('steps_per_epoch'),
                      'batch': scale.batch_size,
                      'limits': [scale.train_limit, scale.val_limit]}, sort_keys=True)
    folder = state_root() / 'shared-models' / hashlib.sha1(key.encode()).hexdigest()[:16]
    path = folder / f'seed{seed}.pth'
    with _lock(folder / f'seed{seed}.lock'):
        if not path.is_file():
            run = train_model(config, tasks, seed, scale, config.get('epochs'))
            info = {'top1': {t['name']: run['history'][-1][f'{t["name"]}_top1'] for t in tasks},
                    'train_time': run['seconds'], 'history': run['history']}
            atomic_save({'key': key, 'state_dict': run['model'].state_dict(), 'info': info}, str(path))
            (folder / 'key.json').write_text(key)
    saved = torch.load(path, map_location='cpu', weights_only=True)
    model = build_task_model(model_config(config, tasks, scale))
    model.load_state_dict(saved['state_dict'])
    return model.to(default_device()).eval(), saved['info']


def alphas_and_sharing(model: MultiTaskIsoMix, tasks: Optional[List[str]] = None) -> Dict[str, Any]:
    """{'task_alphas': alpha (L, K) per task, 'js_per_layer': mean pairwise Jensen-Shannon per layer}.

    No sharing is measured between tasks that mix different banks (independent networks): None.
    """
    alphas = {t: a for t, a in model.alphas().items() if tasks is None or t in tasks}
    one_bank = all(model.tasks[t].bank is None for t in alphas)
    return {'task_alphas': alphas, 'js_per_layer': js_sharing(alphas).tolist() if len(alphas) > 1 and one_bank else None}


def accuracies(model: MultiTaskIsoMix, val: Dict[str, TensorDataset]) -> Dict[str, float]:
    return {t: evaluate(model, t, ds) for t, ds in val.items()}
