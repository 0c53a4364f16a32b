"""Routing Networks (Rosenbaum et al., ICLR 2018) against this paper's soft mixtures, on the same banks (issue 14).

Every configuration trains the same trunk (`isomix_iso_64_8_p2` at width 48, patch 4: 8 executed layers over
a bank of 4 BasicBlock templates) jointly on its tasks with `tasks.fit.fit_tasks` (one batch of every task
per step, AdamW, cosine schedule, the multi-task studies' recipe, no augmentation), so every method takes
the same steps on the same data with the same template parameters:
  route_task_wpl        per-task routing, WPL (one tabular agent per task), as the paper's CIFAR/MIN-MTL models;
  route_task_reinforce  per-task routing, REINFORCE with a learned baseline;
  route_input_gumbel    per-input routing (a small net per layer on the pooled input and a task embedding),
                        straight-through Gumbel-softmax, temperature 2 -> 0.5;
  route_input_reinforce per-input routing, REINFORCE with a learned baseline;
  isomix                this paper: soft per-task mixtures, per-task statistics and heads;
  hard_shared           one trunk (statistics included), per-task heads;
  independent           one network per task.
Rewards are each example's negated cross-entropy; routers train at lr 3e-2 (task tables: the mixtures' lr,
3e-3 x mixture_lr_mult 10) or 1e-2 (per-input nets), no weight decay. Routed models share BatchNorm
statistics across tasks (one set per executed layer and template, bank.RoutedLayer); the mixture models keep
them per task.

Studies:
- routing-min-mtl: Routing Networks' MIN-MTL protocol on miniimagenet32 (mini-ImageNet's 100 classes at 32 px):
  20 tasks of 5 classes. The classes are the sorted WordNet ids of the training folder; task i takes classes
  5i .. 5i+4, labelled 0..4 in that order (`min_mtl_tasks`).
  4 epochs of the 2,500 training images per task (160 joint steps), evaluated on the 500 validation images.
- routing-digits-cifar10: MNIST, USPS, MNIST-M and CIFAR-10 (10 classes each), the multi-task set, with the
  multi-task study's budget (300 joint steps of 64 images per task). Only the routers run here: the soft
  mixtures, hard-shared trunk and independent networks of that budget are multitask-digits-cifar10's runs
  (the same trunk, data, steps and seeds).
- routing-scaling: training time per task as the number of MIN-MTL tasks grows (2, 5, 10, 20; the first n
  tasks; 1 epoch of 1,000 images per task), per-task routing (WPL) against soft mixtures and independent
  networks: the paper's claim that a routing network's per-task training cost stays nearly constant.
Protocol differences from the paper: a convolutional bank routed at every executed layer (the paper routes 3
fully connected layers after a shared conv trunk, with as many function blocks as tasks); 32 px images;
CPU-sized epochs; AdamW rather than SGD.
"""
import os
import time
from typing import Any, Dict, List

import torch

from timm_isomix.tasks.fit import fit_tasks
from timm_isomix.models.routed_multitask import build_routed_task_model
from timm_isomix.tasks.route_usage import route_usage
from timm_isomix.train.datasets import prepare_dataset
from ..runner import RunState, Scale, Study, register
from .multitask_learning import STEPS
from ..task_runs import TRAINING, accuracies, alphas_and_sharing, task_sets, train_model

__all__ = ['min_mtl_tasks', 'run_routing']

TRUNK = dict(model='isomix_iso_64_8_p2', model_kwargs=dict(width=48, patch_size=4, depth=8, num_templates=4))
DIGITS = [{'name': n, 'data': n, 'classes': 10} for n in ('mnist', 'usps', 'mnistm', 'cifar10')]
METHODS: Dict[str, Dict[str, Any]] = {
    'route_task_wpl': dict(routing='task', router='wpl', router_lr=3e-2),
    'route_task_reinforce': dict(routing='task', router='reinforce', router_lr=3e-2),
    'route_input_gumbel': dict(routing='input', router='gumbel', router_lr=1e-2,
                               router_args=dict(tau=2.0, tau_end=0.5)),
    'route_input_reinforce': dict(routing='input', router='reinforce', router_lr=1e-2),
    'isomix': dict(mixture_init='random', init_logit=None),
    'hard_shared': dict(hard_shared=True),  # one mixture for all tasks, so its start does not matter
    'independent': dict(independent=True, mixture_init='random', init_logit=None),
}


def min_mtl_tasks(num_tasks: int = 20) -> List[Dict[str, Any]]:
    """MIN-MTL: task i takes the classes 5i .. 5i+4 of miniimagenet32's sorted class folders."""
    classes = sorted(os.listdir(os.path.join(prepare_dataset('miniimagenet32'), 'train')))
    if len(classes) < 5 * num_tasks:
        raise ValueError(f'miniimagenet32 has {len(classes)} classes, {num_tasks} tasks of 5 need {5 * num_tasks}')
    return [{'name': f'min{i:02d}', 'data': 'miniimagenet32', 'classes': classes[5 * i:5 * i + 5]}
            for i in range(num_tasks)]


def _tasks(config: Dict[str, Any]) -> List[Dict[str, Any]]:
    tasks = config['tasks']
    return min_mtl_tasks(int(tasks.split(':')[1])) if isinstance(tasks, str) else tasks


def _train_routed(config: Dict[str, Any], tasks, seed: int, scale: Scale) -> Dict[str, Any]:
    train, val = task_sets(tasks, 32, scale)
    kwargs = dict(config['model_kwargs'])
    if scale.width_mult != 1.0:
        kwargs['width'] = int(round(kwargs['width'] * scale.width_mult))
    classes = {t['name']: t['classes'] if isinstance(t['classes'], int) else len(t['classes']) for t in tasks}
    torch.manual_seed(seed)
    model = build_routed_task_model(config['model'], classes, config['routing'], config['router'],
                                    config.get('router_args'), **kwargs)
    start = time.time()
    history = fit_tasks(model, train, val, epochs=scale.epochs, batch_size=scale.batch_size, seed=seed,
                        router_lr=config['router_lr'], steps_per_epoch=config.get('steps_per_epoch'), **TRAINING)
    return {'model': model, 'history': history, 'seconds': time.time() - start, 'train': train, 'val': val}


def run_routing(config: Dict[str, Any], seed: int, scale: Scale, state: RunState) -> Dict[str, Any]:
    """Train one method on its tasks: accuracy per task and mean, training time (total and per task),
    parameters, and how tasks share templates (route frequencies or mixture weights, Jensen-Shannon per layer)."""
    tasks = _tasks(config)
    names = [t['name'] for t in tasks]
    routed = 'routing' in config
    run = _train_routed(config, tasks, seed, scale) if routed else train_model(config, tasks, seed, scale)
    model = run['model']
    for h in run['history']:
        h['top1'] = sum(h[f'{t}_top1'] for t in names) / len(names)
    top1 = accuracies(model, run['val'])
    if routed:
        usage = route_usage(model, run['val'])
        # how often each template was drawn in training (running frequencies, about the last 100 steps):
        # near-uniform training routes with one-hot eval routes mean the policy never settled
        drawn = torch.stack([model.router.alpha(model._path(t)) for t in names])  # (T, L, K)
        entropy = -(drawn * drawn.clamp_min(1e-12).log()).sum(-1).mean(0)
        sharing = {'task_routes': usage['per_task'], 'js_per_layer': usage['js_per_layer'].tolist(),
                   'train_routes': {t: d.tolist() for t, d in zip(names, drawn)},
                   'train_route_entropy': entropy.tolist()}
        params = sum(p.numel() for p in model.parameters())
    else:
        sharing = alphas_and_sharing(model)
        params = model.param_counts()['total']
    return {
        'top1': sum(top1.values()) / len(top1), **{f'top1_{t}': top1[t] for t in names},
        'params': params, 'train_time': run['seconds'], 'train_time_per_task': run['seconds'] / len(names),
        'num_tasks': len(names), **sharing, 'history': run['history'],
    }


ROUTED = [m for m, c in METHODS.items() if 'routing' in c]
# Full size (GPU): the multi-task study's full trunk (128 channels, 16x16 tokens) and 128 images per task and step;
# MIN-MTL 30 epochs of its 2,500 images per task, the digits set 20 epochs of its mean task with no step cap.
WIDE = dict(model_kwargs=dict(width=128, patch_size=2))


def _configs(tasks, methods, **extra) -> Dict[str, Dict[str, Any]]:
    return {m: dict(TRUNK, tasks=tasks, **METHODS[m], **extra) for m in methods}


register(Study(
    name='routing-min-mtl',
    description='Routing Networks vs soft mixtures on MIN-MTL (miniimagenet32, 20 tasks of 5 classes, sorted '
                'class ids, task i = classes 5i..5i+4); same bank (width 48, 8 layers over 4 templates).',
    configs=_configs('min-mtl:20', METHODS),
    run=run_routing,
    scale=Scale(epochs=4, train_limit=None, val_limit=None, batch_size=64),
    metrics=('top1', 'train_time', 'train_time_per_task', 'params'),
    presets={'full': Scale(epochs=30, train_limit=None, val_limit=None, batch_size=128, overrides=WIDE)},
))

register(Study(
    name='routing-digits-cifar10',
    description='Routing Networks on MNIST, USPS, MNIST-M and CIFAR-10 (10 classes each), same bank (width 48, '
                '8 layers over 4 templates) and budget (300 joint steps) as multitask-digits-cifar10, whose runs '
                'are the soft mixtures, hard-shared and independent controls.',
    configs=_configs(DIGITS, ROUTED, steps_per_epoch=STEPS),
    run=run_routing,
    scale=Scale(epochs=1, train_limit=None, val_limit=None, batch_size=64),
    metrics=('top1', 'top1_mnist', 'top1_usps', 'top1_mnistm', 'top1_cifar10', 'train_time', 'params'),
    presets={'full': Scale(epochs=20, train_limit=None, val_limit=None, batch_size=128,
                           overrides=dict(WIDE, steps_per_epoch=None))},
))

register(Study(
    name='routing-scaling',
    description='Training time per task as the number of MIN-MTL tasks grows (2, 5, 10, 20): per-task routing '
                '(WPL) vs soft mixtures vs independent networks.',
    configs={f'{m}_T{n}': dict(TRUNK, tasks=f'min-mtl:{n}', **METHODS[m])
             for m in ('route_task_wpl', 'isomix', 'independent') for n in (2, 5, 10, 20)},
    run=run_routing,
    scale=Scale(epochs=1, train_limit=1000, val_limit=None, batch_size=64),
    metrics=('train_time_per_task', 'train_time', 'top1'),
    presets={'full': Scale(epochs=1, train_limit=None, val_limit=None, batch_size=128, overrides=WIDE)},
))
