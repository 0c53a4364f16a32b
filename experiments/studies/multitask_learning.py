"""Competitive multi-task learning with soft weight sharing: one bank with per-task mixtures against controls
with per-task normalization statistics.

MNIST, USPS, MNIST-M and CIFAR-10 (10 classes each, 32 px, grey digits repeated to RGB) train jointly,
one batch of every task per step, the same steps for every variant:
  isomix        one bank; per-task mixtures, BatchNorm statistics and heads;
  shared_trunk  one bank and one mixture for all tasks (a hard-shared trunk); per-task statistics and heads;
  model_patch   shared_trunk plus per-task BatchNorm scale and shift (Mudrakarta et al., ICLR 2019);
  independent   one network (stem, bank, mixture) per task;
  hard_shared   one trunk, statistics included; per-task heads (the earlier baseline);
  share_fromN   per-task mixtures in layers 0..N-1, one shared mixture from layer N on (the authors'
                share_mw_after); statistics and heads per task;
  model_patch_lr10  model_patch with the patches at 10x the base lr, the mixture logits' multiplier.
Mixture logits start as independent U(0, 1) draws per task (the authors' single-task start), so no common
start decides which templates tasks share. Each task's full training set is the pool it draws from; the
budget is 300 joint steps of 64 images per task (19,200 images per task: a third of MNIST, 0.4 of
CIFAR-10, USPS 2.6 times, MNIST-M 3.2 times).
MNIST-M's train split is carved from its official test split (the only part available here).
"""
from typing import Any, Dict

from timm_isomix.tasks.train_tasks import VARIANTS
from ..runner import RunState, Scale, Study, register
from ..task_runs import accuracies, alphas_and_sharing, train_model

TASKS = [{'name': n, 'data': n, 'classes': 10} for n in ('mnist', 'usps', 'mnistm', 'cifar10')]
# One epoch = 300 joint steps of 64 images per task (19,200 per task): about 2.5 min on a quiet core, 5 min on
# a core shared with other jobs (measured: 0.46 s / 0.89 s per joint step); the full training sets are the pool.
STEPS = 300
# Full size (GPU): the trunk at 128 channels on 16x16 tokens (patch 2); 128 images per task and step; 20 epochs of
# the mean task's batches with no step cap (4,820 joint steps: CIFAR-10 about 12 passes, MNIST 10).
FULL = Scale(epochs=20, train_limit=None, val_limit=None, batch_size=128,
             overrides=dict(model_kwargs=dict(width=128, patch_size=2), steps_per_epoch=None))
TRUNK = dict(model='isomix_iso_64_8_p2', model_kwargs=dict(width=48, patch_size=4, depth=8, num_templates=4),
             mixture_init='random', init_logit=None)


def run_multitask(config: Dict[str, Any], seed: int, scale: Scale, state: RunState) -> Dict[str, Any]:
    """Train the configuration's variant on its tasks; accuracy per task and mean, parameters, sharing."""
    tasks = config['tasks']
    run = train_model(config, tasks, seed, scale)
    model = run['model']
    top1 = accuracies(model, run['val'])
    counts = model.param_counts()
    names = [t['name'] for t in tasks]
    return {
        'top1': sum(top1.values()) / len(top1), **{f'top1_{t}': top1[t] for t in names},
        'params': counts['total'], 'params_shared': counts['shared'],
        'params_own': sum(counts['own'].values()) / len(names), 'params_used': max(counts['used'].values()),
        'params_own_per_task': counts['own'], 'params_used_per_task': counts['used'],
        'train_time': run['seconds'], 'train_images': {t: len(ds) for t, ds in run['train'].items()},
        **alphas_and_sharing(model), 'history': run['history'],
    }


def _configs() -> Dict[str, Dict[str, Any]]:
    base = dict(TRUNK, tasks=TASKS, steps_per_epoch=STEPS)
    configs = {name: dict(base, **variant) for name, variant in VARIANTS.items()}
    for n in (2, 4, 6):
        configs[f'share_from{n}'] = dict(base, share_from=n)
    # the patch at the mixtures' learning-rate multiplier: both are a task's own few parameters
    configs['model_patch_lr10'] = dict(configs['model_patch'], training=dict(patch_lr_mult=10.))
    return configs


register(Study(
    name='multitask-digits-cifar10',
    description=__doc__.split('\n\n')[0] + ' MNIST, USPS, MNIST-M and CIFAR-10; isomix against a hard-shared trunk '
    'with per-task statistics, the model patch, independent networks, share_from 2/4/6 (300 joint steps of 64 '
    'images per task drawn from the full training sets, width 48). MNIST-M\'s train split is carved from its official test split.',
    configs=_configs(),
    run=run_multitask,
    scale=Scale(epochs=1, train_limit=None, val_limit=None, batch_size=64),
    metrics=('top1', 'top1_mnist', 'top1_usps', 'top1_mnistm', 'top1_cifar10', 'params_own', 'params_used'),
    presets={'full': FULL},
))
