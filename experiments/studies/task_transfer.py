"""Reusing existing modules for a new task by adjusting the computation order: a new task learned as a new
mixture over a trained bank, with controls for the statistics.

A bank is trained on some tasks (once per seed, shared by every configuration); a held-out task is then
added and trained in one transfer mode of `timm_isomix.tasks.transfer.TRANSFER_MODES`, all modes for the
same epochs on the same data, each reporting its trainable parameters:
  mixture_frozen_stats  its mixture logits + head, the source task's BatchNorm statistics kept;
  mixture               its mixture logits + head, statistics re-estimated on its data;
  stats                 nothing trained: the source network and head, statistics re-estimated (AdaBN);
  linear                head only, statistics re-estimated (a linear probe of the re-normalised features);
  patch                 BatchNorm scale and shift + head (the model patch of Mudrakarta et al., ICLR 2019);
  mixture_patch         mixture logits + scale and shift + head;
  full                  everything the task runs (stem, bank, mixture, head): full fine-tuning;
  patch_lr10, mixture_patch_lr10  the two patch modes with the patch at 10x the base lr (the mixture's multiplier).
Two held-out tasks: MNIST-M from a bank trained on MNIST, USPS and CIFAR-10 (start from MNIST's mixture,
statistics and head); CIFAR-10 from a bank trained on five 20-class tasks of mini-ImageNet (32 px; a new
10-class head, so no 'stats' mode). MNIST-M's train split is carved from its official test split.
"""
from typing import Any, Dict

import torch

from timm_isomix.tasks.transfer import TRANSFER_MODES, transfer
from ..runner import RunState, Scale, Study, register
from ..task_runs import shared_model, task_data, training
from .multitask_learning import TRUNK

DIGITS = [{'name': n, 'data': n, 'classes': 10} for n in ('mnist', 'usps', 'cifar10')]
MNISTM = {'name': 'mnistm', 'data': 'mnistm', 'classes': 10}
CIFAR10 = {'name': 'cifar10', 'data': 'cifar10', 'classes': 10}
# Full size (GPU): the multi-task study's full trunk (128 channels, 16x16 tokens), 128 images per task and step;
# the bank trained to convergence, 30 epochs of the sources' mean batches with no step cap; the held-out task for
# 30 epochs (MNIST-M) or 10 (CIFAR-10). The scale's epochs (10) multiply the bank's 3 and the transfer's 3 or 1.
FULL_BANK = dict(model_kwargs=dict(width=128, patch_size=2), epochs=3, steps_per_epoch=None)


def miniimagenet_tasks(num_tasks: int = 5, per_task: int = 20):
    """mini-ImageNet's 100 classes (sorted WordNet ids) cut into `num_tasks` tasks of `per_task` classes."""
    from timm_isomix.train.datasets import prepare_dataset
    classes = sorted(d.name for d in (prepare_dataset('miniimagenet32') / 'train').iterdir() if d.is_dir())
    return [{'name': f'mini{i}', 'data': 'miniimagenet32', 'classes': classes[i * per_task:(i + 1) * per_task]}
            for i in range(num_tasks)]


def run_transfer(config: Dict[str, Any], seed: int, scale: Scale, state: RunState) -> Dict[str, Any]:
    """Train (or load) the seed's bank, add the held-out task in the configuration's mode, measure it."""
    sources = config['sources'] if config['sources'] != 'miniimagenet' else miniimagenet_tasks()
    pretrain = dict(config['pretrain'], epochs=config['pretrain']['epochs'] * scale.epochs)  # --epochs scales both
    model, info = shared_model(pretrain, sources, seed, scale)
    held = config['held_out']
    img_size = config['pretrain'].get('img_size', 32)
    train = task_data(held, 'train', img_size, held.get('train_limit', scale.train_limit))
    val = task_data(held, 'val', img_size, scale.val_limit)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(seed)
    res = transfer(model, held['name'], held['classes'], train, val, mode=config['mode'],
                   init_from=config.get('init_from'), epochs=config['transfer_epochs'] * scale.epochs,
                   batch_size=scale.batch_size,
                   seed=seed, **training(config))
    after = model.state_dict()
    for h in res['history']:
        h['top1'] = h.get(f'{held["name"]}_top1')
    return {
        'top1': res['top1'], 'trainable': res['trainable'], 'task_params': res['task_params'],
        'params': model.param_counts()['used'][held['name']],
        'bank_unchanged': all(torch.equal(v, after[k]) for k, v in frozen.items()),
        'pretrain_top1': info['top1'], 'pretrain_time': info['train_time'], 'train_images': len(train),
        'history': res['history'],
    }


def _configs(sources, held, init_from, transfer_epochs, modes, pretrain_epochs, pretrain_steps=None):
    pretrain = dict(TRUNK, epochs=pretrain_epochs, steps_per_epoch=pretrain_steps)
    configs = {mode: dict(pretrain=pretrain, sources=sources, held_out=held, init_from=init_from, mode=mode,
                          transfer_epochs=transfer_epochs) for mode in modes}
    for mode in ('patch', 'mixture_patch'):  # the patch at the mixture logits' multiplier, as in the multi-task study
        configs[f'{mode}_lr10'] = dict(configs[mode], training=dict(patch_lr_mult=10.))
    return configs


register(Study(
    name='transfer-mnistm',
    description='A new task over existing modules, digits: MNIST-M learned over a bank trained on MNIST, USPS '
                'and CIFAR-10 (400 joint '
                'steps of 64 images per task from their full training sets), in each transfer mode for 10 epochs of MNIST-M\'s 6,001 training '
                'images (carved from its official test split).',
    configs=_configs(DIGITS, MNISTM, 'mnist', 10, list(TRANSFER_MODES), 1, pretrain_steps=400),
    run=run_transfer,
    scale=Scale(epochs=1, train_limit=None, val_limit=None, batch_size=64),
    metrics=('top1', 'trainable'),
    presets={'full': Scale(epochs=10, train_limit=None, val_limit=None, batch_size=128,
                           overrides=dict(pretrain=FULL_BANK, transfer_epochs=3))},
))

register(Study(
    name='transfer-cifar10',
    description='A new task over existing modules, natural images: CIFAR-10 learned over a bank trained on five '
                '20-class mini-ImageNet '
                'tasks (2 epochs of their 10,000 images each), in each transfer mode for 1 epoch of '
                'CIFAR-10\'s 50,000 training images (a new head: no statistics-only mode).',
    configs=_configs('miniimagenet', CIFAR10, 'mini0', 1, [m for m in TRANSFER_MODES if m != 'stats'], 2),
    run=run_transfer,
    scale=Scale(epochs=1, train_limit=None, val_limit=None, batch_size=64),
    metrics=('top1', 'trainable'),
    presets={'full': Scale(epochs=10, train_limit=None, val_limit=None, batch_size=128,
                           overrides=dict(pretrain=FULL_BANK))},
))
