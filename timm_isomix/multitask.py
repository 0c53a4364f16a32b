"""Tasks (or domains) owning mixtures over one template bank: multi-task isomix.

One isometric trunk's stem and `TemplateBank` are shared by every task. Each task owns a
`TaskPath`: the statistics of the stem's BatchNorm, one or two `Schedule`s (its own `Mixture`
logits and per-layer BatchNorm statistics) and a classifier head. With `share_from=i`, the
layers from i on take their mixture from one `Mixture` shared by all tasks (each task still
keeps its own statistics there). A new task is a new `TaskPath`: a few hundred logits and a
head, learned with the bank frozen (see `adapt.py`).

`train_tasks(args)` trains the tasks listed in a YAML file jointly (`train.py --tasks PATH`).
"""
import copy
import json
import logging
import random
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .bank import Mixture, Schedule, cyclic_order
from .blocks import batch_norm
from .models.isometric import IsoMixNet

__all__ = [
    'TaskPath', 'MultiTaskIsoMix', 'count_params', 'load_task_data', 'read_task_config', 'fit_tasks',
    'evaluate', 'build_task_model', 'load_task_model', 'train_tasks',
]

_logger = logging.getLogger(__name__)


def count_params(module_or_params: Union[nn.Module, Iterable[nn.Parameter]], trainable_only: bool = False) -> int:
    """Number of distinct parameter elements (shared tensors counted once)."""
    params = module_or_params.parameters() if isinstance(module_or_params, nn.Module) else module_or_params
    seen = {}
    for p in params:
        if not trainable_only or p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())


class TaskPath(nn.Module):
    """What one task owns: stem statistics, schedules (mixture logits + layer statistics), head."""

    def __init__(self, stem_stats: nn.BatchNorm2d, schedules: Sequence[Schedule], head: nn.Linear):
        super().__init__()
        self.stem_stats = stem_stats
        self.schedules = nn.ModuleList(schedules)
        self.head = head

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def alpha(self) -> torch.Tensor:
        """Mixture weights (L, K) of all the layers this task runs."""
        return torch.cat([s.mixture.alpha() for s in self.schedules], 0)


class MultiTaskIsoMix(nn.Module):
    """One shared stem and bank, one `TaskPath` per task; `model(x, task=name)`."""

    def __init__(
            self,
            trunk: IsoMixNet,
            tasks: Dict[str, int],
            share_from: Optional[int] = None,
            init_logit: Optional[float] = None,
    ):
        """
        Args:
            trunk: an isometric isomix model with a learnable mixture; its stem and bank are taken
                (shared, not copied), its mixture logits and statistics seed every new task.
            tasks: task name -> number of classes.
            share_from: layers from this index on share one mixture across tasks (None: no sharing).
            init_logit: if given, tasks start from the cyclic order with this logit (a soft start
                from which mixtures can move) instead of the trunk's logits.
        """
        super().__init__()
        mixture = trunk.schedule.mixture
        if mixture.is_hard:
            raise ValueError('the trunk runs a hard order; multi-task mixtures need learnable logits '
                             '(build the trunk without `order`)')
        depth, k = mixture.num_layers, mixture.num_templates
        if share_from is not None and not 0 <= share_from <= depth:
            raise ValueError(f'share_from must be a layer index in 0..{depth}, got {share_from}')
        self.depth, self.num_templates, self.temperature = depth, k, mixture.temperature
        self.share_from = share_from if share_from is not None and share_from < depth else None
        self.num_features = trunk.num_features
        self.stem = trunk.stem
        self.bank = trunk.bank
        self.layer_fn = trunk.schedule.layer_fn
        self.pool = trunk.global_pool
        # Seeds for new tasks: the trunk's logits (or a soft cyclic start) and statistics.
        logits = mixture.logits.detach().clone()
        if init_logit is not None:
            logits = torch.zeros_like(logits)
            logits[torch.arange(depth), torch.tensor(cyclic_order(depth, k))] = init_logit
        # Plain tensors and state dicts, not submodules: seeds are no part of the model's state.
        self._seed_logits = logits
        self._seed_stem_state = {k: v.detach().clone() for k, v in _stats_of(trunk.stem.bn).state_dict().items()}
        self._seed_layer_states = [{k: v.detach().clone() for k, v in layer.state_dict().items()}
                                   for layer in trunk.schedule.layers]
        self.shared_mixture = None
        if self.share_from is not None:
            self.shared_mixture = self._mixture(self.share_from, depth, logits)
        self.tasks = nn.ModuleDict()
        for name, num_classes in tasks.items():
            self.add_task(name, num_classes)

    # --- tasks ------------------------------------------------------------------------------
    def _mixture(self, start: int, end: int, logits: torch.Tensor) -> Mixture:
        # On the bank's device: the seeds stay where the trunk was built, the model may have moved since.
        m = Mixture(end - start, self.num_templates, temperature=self.temperature,
                    device=self.bank.weight.device, dtype=self.bank.weight.dtype)
        with torch.no_grad():
            m.logits.copy_(logits[start:end])
        return m

    def _schedule(self, mixture: Mixture, layer_states: Sequence[dict]) -> Schedule:
        s = Schedule(self.layer_fn, mixture, device=self.bank.weight.device, dtype=self.bank.weight.dtype)
        for layer, state in zip(s.layers, layer_states):
            layer.load_state_dict(state)
        return s

    def add_task(
            self,
            name: str,
            num_classes: int,
            init_from: Optional[str] = None,
            share_head_with: Optional[str] = None,
            share_trunk_with: Optional[str] = None,
    ) -> TaskPath:
        """Add a task to a (trained) model.

        Args:
            name: the new task's name.
            num_classes: classes of its head.
            init_from: start its mixture logits and statistics from this task's (default: the seeds).
            share_head_with: use this task's head (the same module: e.g. one classifier for several domains).
            share_trunk_with: use this task's stem statistics and schedules (the same modules): a
                hard-shared trunk, only the head is the new task's own.
        """
        if not isinstance(name, str) or not name or '.' in name or name in self.tasks:
            raise ValueError(f'task name must be a new non-empty string without ".", got {name!r} '
                             f'(existing tasks: {list(self.tasks)})')
        if int(num_classes) < 1:
            raise ValueError(f'task {name!r} needs at least one class, got num_classes={num_classes}')
        for other in (init_from, share_head_with, share_trunk_with):
            if other is not None:
                self._path(other)
        dd = dict(device=self.bank.weight.device, dtype=self.bank.weight.dtype)
        if share_head_with is not None:
            head = self.tasks[share_head_with].head
            if head.out_features != num_classes:
                raise ValueError(f'task {name!r} has {num_classes} classes but the head of {share_head_with!r} '
                                 f'it should share has {head.out_features}')
        else:
            head = nn.Linear(self.num_features, num_classes, **dd)
        if share_trunk_with is not None:
            src = self.tasks[share_trunk_with]
            path = TaskPath(src.stem_stats, list(src.schedules), head)
        else:
            if init_from is not None:
                src = self.tasks[init_from]
                logits = torch.cat([s.mixture.logits.detach() for s in src.schedules], 0)
                stem_state = src.stem_stats.state_dict()
                layers = [layer.state_dict() for s in src.schedules for layer in s.layers]
            else:
                logits, stem_state, layers = self._seed_logits, self._seed_stem_state, self._seed_layer_states
            own = self.share_from if self.share_from is not None else self.depth
            schedules = []
            if own > 0:
                schedules.append(self._schedule(self._mixture(0, own, logits), layers[:own]))
            if self.shared_mixture is not None:
                schedules.append(self._schedule(self.shared_mixture, layers[own:]))
            stem_stats = _stats_of(self.stem.bn)
            stem_stats.load_state_dict(stem_state)
            path = TaskPath(stem_stats, schedules, head)
        path.train(self.training)
        self.tasks[name] = path
        return path

    def _path(self, task: str) -> TaskPath:
        if task not in self.tasks:
            raise KeyError(f'unknown task {task!r}; this model has tasks {list(self.tasks)}')
        return self.tasks[task]

    def task_names(self) -> List[str]:
        return list(self.tasks)

    def mixtures(self) -> Dict[str, Mixture]:
        """Every distinct mixture, by name ('<task>.<i>' for a task's own, 'shared' for the shared one)."""
        out = {}
        for name, path in self.tasks.items():
            for i, s in enumerate(path.schedules):
                if s.mixture is not self.shared_mixture and all(s.mixture is not m for m in out.values()):
                    out[f'{name}.{i}'] = s.mixture
        if self.shared_mixture is not None:
            out['shared'] = self.shared_mixture
        return out

    def alphas(self) -> Dict[str, torch.Tensor]:
        """Mixture weights (L, K) per task."""
        return {name: path.alpha().detach() for name, path in self.tasks.items()}

    def task_parameters(self, task: str) -> List[nn.Parameter]:
        """The parameters only this task uses: its own mixture logits and its head (unless shared)."""
        path = self._path(task)
        shared = {id(p) for other, op in self.tasks.items() if other != task for p in op.parameters()}
        shared |= {id(p) for p in self.bank.parameters()} | {id(p) for p in self.stem.parameters()}
        return [p for p in path.parameters() if id(p) not in shared]

    def task_state_dict(self, task: str) -> Dict[str, torch.Tensor]:
        """One task's checkpoint: its mixtures (incl. the shared one), statistics and head."""
        return {k: v.detach().clone() for k, v in self._path(task).state_dict().items()}

    def load_task_state_dict(self, task: str, state_dict: Dict[str, torch.Tensor]) -> None:
        self._path(task).load_state_dict(state_dict)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'*mixture.logits', 'bank.affine', 'stem.bn.*'}

    # --- forward ----------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, task: str) -> torch.Tensor:
        path = self._path(task)
        x = self.stem.conv(x)
        x = self.stem.act(batch_norm(x, path.stem_stats, self.stem.bn.weight, self.stem.bn.bias))
        for schedule in path.schedules:
            x = schedule(x, self.bank)
        return x

    def forward_head(self, x: torch.Tensor, task: str, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        return x if pre_logits else self._path(task).head(x)

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, task), task)


def _stats_of(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """An affine-free BatchNorm holding a copy of `bn`'s running statistics."""
    stats = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=False,
                           device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    stats.load_state_dict({k: v for k, v in bn.state_dict().items() if k not in ('weight', 'bias')})
    return stats


# --- data --------------------------------------------------------------------------------------
def load_task_data(
        root: Union[str, Path],
        split: str,
        classes: Union[int, Sequence[str]],
        img_size: int = 32,
        limit: Optional[int] = None,
        seed: int = 0,
        task: str = '',
) -> TensorDataset:
    """A (random, seeded) subset of an ImageFolder split as tensors: RGB (grey repeated), resized, in [-1, 1].

    Small subsets held in memory make several epochs cheap on a CPU. Raises ValueError when the
    folder's classes are not the task's (`classes`: a count or the list of class folder names).
    """
    from torchvision import transforms
    from torchvision.datasets import ImageFolder
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f'task {task!r}: no {split}/ folder in {root}')
    ds = ImageFolder(str(folder))  # the default loader converts to RGB: grey digits get 3 channels
    if isinstance(classes, int):
        if len(ds.classes) != classes:
            raise ValueError(f'task {task!r} declares {classes} classes but {folder} has {len(ds.classes)}: {ds.classes}')
    elif list(map(str, classes)) != ds.classes:
        raise ValueError(f'task {task!r} declares classes {list(classes)} but {folder} has {ds.classes}')
    idx = list(range(len(ds)))
    if limit is not None and limit < len(ds):
        idx = sorted(random.Random(seed).sample(idx, limit))
    tf = transforms.Compose([
        transforms.Resize((img_size, img_size)), transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    xs = torch.stack([tf(ds.loader(ds.samples[i][0])) for i in idx])
    ys = torch.tensor([ds.samples[i][1] for i in idx])
    return TensorDataset(xs, ys)


def read_task_config(path: Union[str, Path, dict]) -> dict:
    """Read and check a task YAML: `tasks` is a list of {name, data, classes}; the rest is optional."""
    import yaml
    if isinstance(path, dict):  # an already-read config (experiments, tests)
        cfg, path = copy.deepcopy(path), '<config>'
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f'task file {path} does not exist')
        cfg = yaml.safe_load(path.read_text()) or {}
    tasks = cfg.get('tasks')
    if not isinstance(tasks, list) or not tasks:
        raise ValueError(f'{path}: expected a non-empty list under "tasks", got {tasks!r}')
    names = []
    for i, t in enumerate(tasks):
        missing = [k for k in ('name', 'data', 'classes') if not isinstance(t, dict) or k not in t]
        if missing:
            raise ValueError(f'{path}: task #{i} lacks {missing} (each task needs name, data, classes)')
        if not (isinstance(t['classes'], int) or isinstance(t['classes'], list)):
            raise ValueError(f'{path}: task {t["name"]!r}: classes must be a count or a list of names')
        names.append(t['name'])
    if len(set(names)) != len(names):
        raise ValueError(f'{path}: task names repeat: {names}')
    return cfg


# --- training ----------------------------------------------------------------------------------
class _JointStep(nn.Module):
    """One forward over a batch of every task, so DDP sees one forward per backward."""

    def __init__(self, model: MultiTaskIsoMix):
        super().__init__()
        self.model = model

    def forward(self, batches: Dict[str, Tuple[torch.Tensor, torch.Tensor]]):
        losses, correct = {}, {}
        for task, (x, y) in batches.items():
            out = self.model(x, task=task)
            losses[task] = F.cross_entropy(out, y)
            correct[task] = (out.argmax(-1) == y).sum()
        return sum(losses.values()), losses, correct


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
) -> List[dict]:
    """Train tasks jointly with balanced task sampling: every step takes one batch of every task.

    An epoch has as many steps as the mean task has batches (small tasks cycle, large ones are
    subsampled), so each task weighs the same whatever its size. The parameters requiring grad
    are trained (freeze the others first, as adapt.freeze_for_transfer does); with `frozen_stats`, BatchNorm statistics stay as they are
    (eval mode), e.g. for a linear probe. Returns per-epoch metrics: train loss/accuracy and val
    top-1 per task.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    for task in train_sets:
        model._path(task)
    if not train_sets:
        raise ValueError('fit_tasks needs at least one task with training data')
    empty = [t for t, ds in train_sets.items() if len(ds) == 0]
    if empty:
        raise ValueError(f'tasks {empty} have no training data')
    from .training import mixture_param_groups  # lazy: training is the layer above
    groups = mixture_param_groups(model, weight_decay, lr, mixture_lr_mult)
    if not groups:
        raise ValueError('nothing to train: no parameter requires grad')
    optimizer = create_optimizer_v2(groups, opt=opt, lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    loaders = {}
    for task, ds in train_sets.items():
        if distributed:
            from torch.utils.data.distributed import DistributedSampler
            loaders[task] = DataLoader(ds, batch_size=batch_size, sampler=DistributedSampler(ds, seed=seed),
                                       drop_last=True)
        else:
            loaders[task] = DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=len(ds) > batch_size,
                                       generator=g)
    steps = max(1, round(sum(len(l) for l in loaders.values()) / len(loaders)))
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=epochs, warmup_epochs=warmup_epochs,
                                       warmup_lr=lr * 0.01, min_lr=lr * 0.01, updates_per_epoch=steps)
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


def build_task_model(cfg: dict) -> MultiTaskIsoMix:
    """The multi-task model a task config describes (its `model`, `model_kwargs`, `tasks`, `share_from`,
    `init_logit`, and the baselines' `hard_shared` (one trunk, own heads) or `share_head` (one head))."""
    import timm
    name = cfg.get('model') or 'isomix_iso_64_8_p2'
    trunk = timm.create_model(name, num_classes=0, **(cfg.get('model_kwargs') or {}))
    if not isinstance(trunk, IsoMixNet):
        raise ValueError(f'multi-task models need an isometric isomix trunk (isomix_iso_*), got {name!r}')
    tasks = cfg['tasks']
    model = MultiTaskIsoMix(trunk, {}, share_from=cfg.get('share_from'), init_logit=cfg.get('init_logit', 2.0))
    first = tasks[0]['name']
    for i, t in enumerate(tasks):
        n = t['classes'] if isinstance(t['classes'], int) else len(t['classes'])
        model.add_task(t['name'], n, share_trunk_with=first if i and cfg.get('hard_shared') else None,
                       share_head_with=first if i and cfg.get('share_head') else None)
    return model


def load_task_model(path: Union[str, Path], map_location: str = 'cpu') -> MultiTaskIsoMix:
    """Rebuild a trained multi-task model from the `model.pth` that train_tasks writes (then add tasks to it)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    model = build_task_model(ckpt['config'])
    model.load_state_dict(ckpt['state_dict'])
    return model


def _arg(args, name: str, cfg: dict, default):
    """A run setting: the YAML's value, else the command line's (args), else the default."""
    if name in cfg and cfg[name] is not None:
        return cfg[name]
    value = getattr(args, name, None)
    return default if value is None else value


def train_tasks(args) -> dict:
    """Train the tasks of the YAML file `args.tasks` jointly; the entry point of `train.py --tasks`.

    Settings are read from the YAML (model, model_kwargs, share_from, init_logit, img_size,
    train_limit, val_limit, epochs, lr, batch_size, opt, weight_decay, mixture_lr_mult), falling
    back to the argparse namespace (timm's flag names) and then to small CPU defaults. Writes to
    `<output>/<experiment>` (a new folder, never an existing one): `model.pth` (everything),
    `task_<name>.pth` per task (its mixtures, statistics and head), `summary.csv`, `results.json`,
    `mixtures.png` (alpha per task x layer x template) and `sharing.png` (per-layer Jensen-Shannon).
    Runs under torchrun like single-task training (gloo on CPU, one sampler shard per rank).
    """
    from timm.utils import get_outdir, update_summary
    from .plot_tasks import js_sharing, plot_sharing, plot_task_mixtures
    from .training import atomic_save, setup_distributed  # lazy: training is the layer above
    cfg = read_task_config(args.tasks)
    if getattr(args, 'device', None) is None:
        args.device = None
    device = setup_distributed(args)
    primary = getattr(args, 'rank', 0) == 0
    seed = int(_arg(args, 'seed', {}, 42))
    torch.manual_seed(seed)  # the same initial model on every rank
    img_size = int(_arg(args, 'img_size', cfg, 32))
    cfg['model'] = model_name = _arg(args, 'model', cfg, 'isomix_iso_64_8_p2')
    tasks = cfg['tasks']
    model = build_task_model(cfg).to(device)
    from .datasets import prepare_dataset
    limit_tr, limit_val = cfg.get('train_limit'), cfg.get('val_limit')
    train_sets, val_sets = {}, {}
    for t in tasks:
        root = prepare_dataset(str(t['data']))
        train_sets[t['name']] = load_task_data(root, 'train', t['classes'], img_size, t.get('train_limit', limit_tr),
                                               seed, t['name'])
        val_sets[t['name']] = load_task_data(root, 'val', t['classes'], img_size, t.get('val_limit', limit_val),
                                             seed, t['name'])
    out_dir = None
    if primary:
        stem = Path(args.tasks).stem if not isinstance(args.tasks, dict) else 'config'
        exp = getattr(args, 'experiment', None) or f'tasks-{stem}-{model_name}'
        out_dir = Path(get_outdir(getattr(args, 'output', None) or './output/train', exp, inc=True))
        _logger.info(f'writing to {out_dir}')

    def log(metrics):
        if primary:
            update_summary(metrics['epoch'], {k: v for k, v in metrics.items() if 'train' in k},
                           {k: v for k, v in metrics.items() if 'train' not in k and k != 'epoch'},
                           str(out_dir / 'summary.csv'), write_header=metrics['epoch'] == 1)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()}), flush=True)

    history = fit_tasks(
        model, train_sets, val_sets if primary else None,
        epochs=int(_arg(args, 'epochs', cfg, 3)), lr=float(_arg(args, 'lr', cfg, 2e-3)),
        batch_size=int(_arg(args, 'batch_size', cfg, 64)), opt=_arg(args, 'opt', cfg, 'adamw'),
        weight_decay=float(_arg(args, 'weight_decay', cfg, 0.05)),
        mixture_lr_mult=float(_arg(args, 'mixture_lr_mult', cfg, 10.)),
        warmup_epochs=int(_arg(args, 'warmup_epochs', cfg, 0)),
        device=device, seed=seed, distributed=getattr(args, 'distributed', False), log_fn=log)
    results = {'model': model_name, 'tasks': [t['name'] for t in tasks], 'out_dir': str(out_dir),
               'params': count_params(model), 'history': history,
               'task_params': {t: count_params(model.task_parameters(t)) for t in model.tasks}}
    if primary:
        results['top1'] = {t: history[-1][f'{t}_top1'] for t in model.tasks}
        atomic_save({'config': cfg, 'state_dict': model.state_dict()}, str(out_dir / 'model.pth'))
        for t in model.tasks:
            atomic_save({'task': t, 'num_classes': model.tasks[t].num_classes,
                         'state_dict': model.task_state_dict(t)}, str(out_dir / f'task_{t}.pth'))
        alphas = model.alphas()
        results['js_per_layer'] = js_sharing(alphas).tolist()
        plot_task_mixtures(alphas, out_dir / 'mixtures.png', title=f'{model_name}: alpha per task')
        plot_sharing(alphas, out_dir / 'sharing.png')
        (out_dir / 'results.json').write_text(json.dumps(results, indent=1))
    return results
