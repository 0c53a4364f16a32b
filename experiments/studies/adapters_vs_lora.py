"""A task's adapter against the methods users compare with (issue 20): LoRA through `peft`, a linear probe and full
fine-tuning, all from the same starting function.

Three new tasks, each over one source model trained once (seed 0) and shared by every configuration and seed
(seeds vary the new task's head, the LoRA initialisation and the data order):
  mnistm       MNIST-M over transfer-mnistm's digit bank (MNIST, USPS, CIFAR-10), from MNIST's task and head;
  cifar10      CIFAR-10 over transfer-cifar10's bank of five 20-class mini-ImageNet tasks, from mini0's, a new head;
  cifar10_r50  CIFAR-10 over `isomix_resnet50` (stage banks of K = 2, 3, 5, 2 templates) warm-started from a timm
               resnet50 trained on miniimagenet32 at 32 px (the warm-start study's recipe), a new head.
The methods (METHODS), each reporting its trainable parameters and the bytes of the safetensors file a task ships:
  mixture, patch, mixture_patch  the adapter: `transfer` modes over the MultiTaskIsoMix, the file `save_task`'s;
  lora_matched  peft's LoRA of rank 1 on the convolutions from one end of the baked source network (the head's or
                the stem's: chosen on the held-out split), as many as bring its trainable count (with the head)
                closest to mixture_patch's. The baked network is `model.bake(source task)`, the new task's head in it;
  lora_large    rank 4 on every convolution;
  linear        the baked network's head;
  full          every parameter of the baked network.
Every method re-estimates the BatchNorm statistics on the new task's images (AdaBN), lets them follow the data while
it trains (the linear probe: fixed) and ships them. The recipe is fit_tasks' (AdamW, weight decay 0.05, cosine
from lr to lr / 100, batch 64, no augmentation); the adapter modes keep the project's multipliers (mixture logits
and patch at 10x the head's lr). One lr per method and task (and lora_matched's end) is chosen at seed 0 on a
held-out part of the task's training images (study adapters-vs-lora-select), never on the reported val split;
adapters-vs-lora-compare reads that choice from the selection's result files and reports val top-1 at 3 seeds.
"""
import copy
import fcntl
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import timm
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from timm_isomix.models.multitask import MultiTaskIsoMix
from timm_isomix.models.resnet import resnet_to_isomix
from timm_isomix.tasks.transfer import freeze_for_transfer, transfer
from .. import lora
from ..classify import fit, task_tensors
from ..runner import STUDIES, RunState, Scale, Study, finished_runs, register, state_root
from ..task_runs import DATA_SEED, shared_model, task_data
from .task_transfer import CIFAR10, MNISTM, miniimagenet_tasks
from .warmstart import RECIPE

SOURCE_SEED = 0
NEW = 'new'  # the new task's name in the multi-task model
ADAPTER_MODES = ('mixture', 'patch', 'mixture_patch')
METHODS = (*ADAPTER_MODES, 'lora_matched', 'lora_large', 'linear', 'full')
MATCHED_TO = 'mixture_patch'  # the adapter whose trainable count lora_matched is given
RANKS = {'lora_matched': 1, 'lora_large': 4}
# The lr grids the selection tries (the adapter modes: the head's lr, mixture and patch at 10x).
GRIDS = {**{m: (1e-3, 3e-3, 1e-2) for m in (*ADAPTER_MODES, 'linear', 'lora_large')},
         'lora_matched': (3e-3, 1e-2, 3e-2), 'full': (3e-4, 1e-3, 3e-3)}
# The source of the staged task: timm's resnet50 on a miniimagenet32 subset, trained once.
RESNET50_SOURCE = dict(arch='resnet50', data='miniimagenet32', train_limit=20000, val_limit=2000, epochs=3)
# The new tasks: the data (training subset, its held-out part for the selection, val subset) and epochs.
TASKS: Dict[str, Dict[str, Any]] = {
    'mnistm': dict(source='transfer-mnistm', init_from='mnist', data=MNISTM, train_limit=None, heldout=1000,
                   val_limit=None, epochs=3),
    'cifar10': dict(source='transfer-cifar10', init_from='mini0', data=CIFAR10, train_limit=10000, heldout=2000,
                    val_limit=5000, epochs=2),
    'cifar10_r50': dict(source='resnet50', init_from='source', data=CIFAR10, train_limit=5000, heldout=1000,
                        val_limit=3000, epochs=1),
}
SELECT, COMPARE = 'adapters-vs-lora-select', 'adapters-vs-lora-compare'


def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, 'w')
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _resnet50_source() -> Tuple[MultiTaskIsoMix, Dict[str, Any]]:
    """isomix_resnet50 warm-started from the trained resnet50 (trained once, cached), as a one-task model."""
    s = RESNET50_SOURCE
    folder = state_root() / 'adapters-vs-lora-source' / f'{s["arch"]}-{s["train_limit"]}-{s["epochs"]}'
    path = folder / f'seed{SOURCE_SEED}.pth'
    train, val, num_classes = task_tensors(s['data'], 32, s['train_limit'], s['val_limit'])
    with _locked(folder / f'seed{SOURCE_SEED}.lock'):
        if not path.is_file():
            torch.manual_seed(SOURCE_SEED)
            resnet = timm.create_model(s['arch'], num_classes=num_classes)
            state = RunState(folder / f'seed{SOURCE_SEED}-state')
            out = fit(resnet, train, val, RECIPE, s['epochs'], 64, SOURCE_SEED, state, tag='pretrain')
            torch.save({'state_dict': resnet.cpu().state_dict(), 'history': out['history']}, path)
            state.clear()
    saved = torch.load(path, map_location='cpu', weights_only=True)
    trunk = {k: v for k, v in saved['state_dict'].items() if not k.startswith('fc.')}
    backbone = timm.create_model(f'isomix_{s["arch"]}', num_classes=0)
    backbone.load_state_dict(resnet_to_isomix(trunk, backbone))
    model = MultiTaskIsoMix(backbone, {'source': num_classes})
    model.tasks['source'].head.load_state_dict({k[3:]: v for k, v in saved['state_dict'].items()
                                               if k.startswith('fc.')})
    return model.eval(), {'top1': {'source': saved['history'][-1]['top1']}, 'history': saved['history']}


def source_model(task: str) -> Tuple[MultiTaskIsoMix, Dict[str, Any]]:
    """The trained source model of a new task (a fresh copy each call: a transfer adds a task to it) and its info."""
    spec = TASKS[task]
    if spec['source'] == 'resnet50':
        return _resnet50_source()
    study = STUDIES[spec['source']]  # its bank of seed 0, trained as its own runs train it
    config = study.configs['mixture']
    sources = config['sources'] if config['sources'] != 'miniimagenet' else miniimagenet_tasks()
    pretrain = dict(config['pretrain'], epochs=config['pretrain']['epochs'] * study.scale.epochs)
    return shared_model(pretrain, sources, SOURCE_SEED, study.scale)


def splits(task: str, scale: Scale) -> Tuple[TensorDataset, TensorDataset, TensorDataset]:
    """(train, held-out, val) of a new task: the held-out part is a seeded draw from its training subset (the
    same for every seed), the rest is what every method trains on; `scale`'s limits cap train and val."""
    spec = TASKS[task]
    xs, ys = task_data(spec['data'], 'train', 32, spec['train_limit']).tensors
    order = torch.randperm(len(ys), generator=torch.Generator().manual_seed(DATA_SEED))
    held, rest = order[:spec['heldout']], order[spec['heldout']:]
    if scale.train_limit is not None:
        rest, held = rest[:scale.train_limit], held[:scale.train_limit]
    limits = [n for n in (spec['val_limit'], scale.val_limit) if n is not None]
    val = task_data(spec['data'], 'val', 32, min(limits) if limits else None)
    return TensorDataset(xs[rest], ys[rest]), TensorDataset(xs[held], ys[held]), val


def _classes(task: str) -> int:
    return int(TASKS[task]['data']['classes'])


def adapter_budget(model: MultiTaskIsoMix, init_from: str, num_classes: int) -> int:
    """Trainable parameters of MATCHED_TO's adapter for a new task from `init_from` (counted on a copy)."""
    probe = copy.deepcopy(model)
    probe.add_task('budget', num_classes, init_from=init_from, patch=True)
    return sum(p.numel() for p in freeze_for_transfer(probe, 'budget', MATCHED_TO))


def _file_bytes(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob('*.safetensors'))


def _run_adapter(model, task, method, train, val, fit_kwargs) -> Dict[str, Any]:
    spec = TASKS[task]
    res = transfer(model, NEW, _classes(task), train, val, mode=method, init_from=spec['init_from'],
                   mixture_lr_mult=10., patch_lr_mult=10., **fit_kwargs)
    with tempfile.TemporaryDirectory() as d:
        file_bytes = _file_bytes(model.save_task(NEW, d))
    for h in res['history']:  # the runner's curves read 'top1'
        h['top1'] = h.get(f'{NEW}_top1')
    return {'top1': res['top1'], 'trainable': res['trainable'], 'file_bytes': file_bytes, 'history': res['history']}


def head_name(net: nn.Module) -> str:
    """The name of a baked network's head: what timm's `get_classifier()` returns, else its last Linear."""
    if hasattr(net, 'get_classifier'):
        head = net.get_classifier()
        return next(n for n, m in net.named_modules() if m is head)
    return [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]


def _new_head(net: nn.Module, num_classes: int) -> None:
    """The new task's head in the baked network: the source's when the classes match, else a fresh one."""
    name = head_name(net)
    old = net.get_submodule(name)
    if old.out_features != num_classes:
        net.set_submodule(name, nn.Linear(old.in_features, num_classes, device=old.weight.device))


def _run_plain(model, task, method, train, val, fit_kwargs, end: Optional[str]) -> Dict[str, Any]:
    """LoRA, the linear probe or full fine-tuning of the baked source network."""
    net = model.bake(TASKS[task]['init_from'])
    _new_head(net, _classes(task))
    head = head_name(net)
    extra: Dict[str, Any] = {}
    if method.startswith('lora'):
        rank = RANKS[method]
        if method == 'lora_matched':
            budget = adapter_budget(model, TASKS[task]['init_from'], _classes(task))
            head_count = sum(p.numel() for p in net.get_submodule(head).parameters())
            targets = lora.choose_targets(net, budget - head_count, rank, end)
            extra.update(budget=budget, targets=targets, end=end)
        else:
            targets = lora.conv_layers(net)
        extra.update(rank=rank, layers=len(targets))
        net = lora.add_lora(net, targets, rank, head)
    res = lora.transfer_plain(net, train, val, 'lora' if method.startswith('lora') else method, head, **fit_kwargs)
    stats = lora.safetensors_bytes(lora.bn_statistics(net))
    if method.startswith('lora'):
        with tempfile.TemporaryDirectory() as d:
            net.save_pretrained(d)
            file_bytes = _file_bytes(d) + stats
    elif method == 'linear':
        file_bytes = lora.safetensors_bytes({**dict(net.get_submodule(head).named_parameters()),
                                             **lora.bn_statistics(net)})
    else:
        file_bytes = lora.safetensors_bytes(net.state_dict())
    return {**res, 'file_bytes': file_bytes, 'stats_bytes': stats, **extra}


def chosen(task: str, method: str) -> Dict[str, Any]:
    """{'lr', 'end', 'heldout_top1'} of the best held-out run of the selection study (seed 0)."""
    runs = finished_runs(SELECT)
    best = None
    for name, config in STUDIES[SELECT].configs.items():
        if config['task'] == task and config['method'] == method:
            if SOURCE_SEED not in runs.get(name, {}):
                raise FileNotFoundError(f'{SELECT} has no result for {name!r}: run '
                                        f'`python -m experiments run {SELECT} --seeds 0` first')
            top1 = runs[name][SOURCE_SEED]['result']['top1']
            if best is None or top1 > best['heldout_top1']:
                best = {'lr': config['lr'], 'end': config.get('end'), 'heldout_top1': top1}
    return best


def run_method(config: Dict[str, Any], seed: int, scale: Scale, state: RunState) -> Dict[str, Any]:
    """Train the new task in one method; top-1 on the held-out split (selection) or on val (comparison)."""
    task, method = config['task'], config['method']
    pick = {'lr': config['lr'], 'end': config.get('end')} if config.get('select') else chosen(task, method)
    model, info = source_model(task)
    train, heldout, val = splits(task, scale)
    measured = heldout if config.get('select') else val
    fit_kwargs = dict(epochs=TASKS[task]['epochs'] * scale.epochs, batch_size=scale.batch_size, seed=seed,
                      lr=pick['lr'], opt='adamw', weight_decay=0.05)
    torch.manual_seed(seed)
    if method in ADAPTER_MODES:
        res = _run_adapter(model, task, method, train, measured, fit_kwargs)
    else:
        res = _run_plain(model, task, method, train, measured, fit_kwargs, pick['end'])
    return {**res, **{k: v for k, v in pick.items() if v is not None}, 'source_top1': info['top1'],
            'train_images': len(train), 'measured_on': 'heldout' if config.get('select') else 'val',
            'measured_images': len(measured)}


def _select_configs() -> Dict[str, Dict[str, Any]]:
    configs = {}
    for task in TASKS:
        for method in METHODS:
            for lr in GRIDS[method]:
                for end in (lora.ENDS if method == 'lora_matched' else (None,)):
                    name = f'{task}.{method}.lr{lr:g}' + (f'.{end}' if end else '')
                    configs[name] = dict(task=task, method=method, lr=lr, end=end, select=True)
    return configs


_SIZES = ('MNIST-M: 5,001 training images (1,000 of its 6,001 held out), 3 epochs, val 3,000; CIFAR-10 over the '
          'bank: 8,000 of a 10,000-image subset (2,000 held out), 2 epochs, val 5,000; CIFAR-10 over isomix_resnet50: '
          '4,000 of a 5,000-image subset (1,000 held out), 1 epoch, val 3,000')

register(Study(
    name=SELECT,
    description='Adapters against LoRA, the lr of each method (and lora_matched\'s end) at seed 0: top-1 on the '
                f'held-out part of each task\'s training images. {_SIZES}.',
    configs=_select_configs(),
    run=run_method,
    scale=Scale(epochs=1, train_limit=None, val_limit=None, batch_size=64),
    metrics=('top1', 'trainable', 'file_bytes'),
    min_seeds=1,
))

register(Study(
    name=COMPARE,
    description='Adapters (mixture, patch, mixture_patch) against LoRA through peft (matched to mixture_patch\'s '
                'trainable parameters, and rank 4 on every convolution), the linear probe and full fine-tuning of '
                f'the baked source network, val top-1 at the held-out choice of lr. {_SIZES}.',
    configs={f'{task}.{method}': dict(task=task, method=method, lr=None) for task in TASKS for method in METHODS},
    run=run_method,
    scale=Scale(epochs=1, train_limit=None, val_limit=None, batch_size=64),
    metrics=('top1', 'trainable', 'file_bytes'),
))
