"""Reusing the same block several times in an existing architecture: a deeper staged network warm-started
from a trained ResNet.

timm's resnet26 is trained once on a miniimagenet32 subset (seed 0): the one pretrained checkpoint a user
starts from. Then, per seed (the fine-tuning's data order), for the same number of fine-tuning epochs and
the same recipe:
- `resnet26-continue`: the ResNet trains on;
- `isomix-reuse2-warm`: `isomix_resnet26` with `reuse=2` (each stage's template runs twice: twice the
  banked depth, the ResNet's parameters) is warm-started from it (`resnet_to_isomix`) and fine-tuned.
The isomix run also records `top1_before`: the deeper network's accuracy right after the warm start, before
any fine-tuning (what `pretrained=True, reuse=2` gives a user), and `top1_reuse1`: the warm start at
reuse 1, which must equal the ResNet's own accuracy.
"""
import fcntl
from typing import Any, Dict

import timm
import torch

from timm_isomix.models.resnet import resnet_to_isomix
from ..classify import DEFAULTS, evaluate, fit, task_tensors
from ..runner import RunState, Scale, Study, register, state_root

PRETRAIN_EPOCHS = 4
PRETRAIN_SEED = 0
RECIPE = dict(DEFAULTS, data='miniimagenet32', lr=2e-3, warmup_epochs=1)
FINETUNE = dict(RECIPE, lr=5e-4, warmup_epochs=0)


def _pretrained_resnet(seed: int, scale: Scale, train, val, num_classes: int) -> Dict[str, Any]:
    """The pretrained resnet26 of a seed (trained once, cached; a lock keeps parallel runs from training it twice)."""
    folder = state_root() / 'warmstart-pretrain' / f'{scale.train_limit or "all"}-{PRETRAIN_EPOCHS}'
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f'seed{seed}.pth'
    with open(folder / f'seed{seed}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            torch.manual_seed(seed)
            model = timm.create_model('resnet26', num_classes=num_classes)
            out = fit(model, train, val, RECIPE, PRETRAIN_EPOCHS, scale.batch_size, seed,
                      RunState(folder / f'seed{seed}-state'), tag='pretrain')
            torch.save({'state_dict': model.state_dict(), 'history': out['history']}, path)
            RunState(folder / f'seed{seed}-state').clear()
    return torch.load(path, weights_only=True)


def run_warmstart(config: Dict[str, Any], seed: int, scale: Scale, state: RunState) -> Dict[str, Any]:
    train, val, num_classes = task_tensors(RECIPE['data'], 32, scale.train_limit, scale.val_limit)
    pre = _pretrained_resnet(PRETRAIN_SEED, scale, train, val, num_classes)
    resnet = timm.create_model('resnet26', num_classes=num_classes)
    resnet.load_state_dict(pre['state_dict'])
    extra = {'top1_pretrained': pre['history'][-1]['top1'], 'pretrain_history': pre['history']}
    if config['variant'] == 'continue':
        model = resnet
    else:
        shallow = timm.create_model('isomix_resnet26', reuse=1, num_classes=num_classes)
        shallow.load_state_dict(resnet_to_isomix(pre['state_dict'], shallow))
        model = timm.create_model('isomix_resnet26', reuse=2, num_classes=num_classes)
        model.load_state_dict(resnet_to_isomix(pre['state_dict'], model))
        extra.update(top1_reuse1=evaluate(shallow, val), top1_before=evaluate(model, val))
    torch.manual_seed(seed)
    out = fit(model, train, val, FINETUNE, scale.epochs, scale.batch_size, seed, state, tag='finetune')
    history = out['history']
    return {'top1': history[-1]['top1'], 'params': sum(p.numel() for p in model.parameters()),
            'train_time': sum(h['time'] for h in history), 'history': history, **extra}


register(Study(
    name='warmstart-miniimagenet32',
    description=f'Warm start on miniimagenet32 (25k training images): one resnet26 pretrained {PRETRAIN_EPOCHS} '
                'epochs, then fine-tuned on, against isomix_resnet26 reuse=2 warm-started from it and fine-tuned '
                'for the same epochs (seeds: the fine-tuning\'s data order).',
    configs={'resnet26-continue': dict(variant='continue'), 'isomix-reuse2-warm': dict(variant='isomix')},
    run=run_warmstart,
    scale=Scale(epochs=1, train_limit=25000, val_limit=5000, batch_size=64),
    # full: all 50,000 images and 10 fine-tuning epochs at batch 256 (the pretraining's length is PRETRAIN_EPOCHS)
    presets={'full': Scale(epochs=10, train_limit=None, val_limit=None, batch_size=256)},
    metrics=('top1', 'top1_before', 'top1_pretrained', 'top1_reuse1'),
))
