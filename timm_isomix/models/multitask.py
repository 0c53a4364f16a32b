"""Tasks (or domains) owning mixtures over one template bank: multi-task isomix and its controls.

One isometric trunk's stem and `TemplateBank` are shared by every task. Each task owns a
`TaskPath`: the statistics of the stem's BatchNorm, one or two `Schedule`s (its own `Mixture`
logits and per-layer BatchNorm statistics) and a classifier head. With `share_from=i`, the
layers from i on take their mixture from one `Mixture` shared by all tasks (each task still
keeps its own statistics there). A new task is a new `TaskPath`: a few hundred logits and a
head, learned with the bank frozen (`timm_isomix.tasks.transfer`).

The controls that separate the mixtures from the normalization statistics are the same class:
  - `share_from=0`: one mixture for all tasks, i.e. a hard-shared trunk with per-task statistics and heads;
  - `add_task(patch=True)`: the task owns its BatchNorm scale and shift (stem and every layer), which
    replace the bank's mixed ones: with `share_from=0` the "model patch" of Mudrakarta et al.
    ("K for the Price of 1", ICLR 2019): shared kernels, per-task statistics, scale, shift and head;
  - `add_task(own_trunk=True)`: the task runs its own copy of the stem and bank (independent networks);
  - `add_task(share_trunk_with=...)`: one trunk, statistics included, for several tasks.
Parameters are counted over the tensors a task's forward uses (`used_parameters`), each shared
tensor once; a task's own parameters are those no other task uses (`task_parameters`).
"""
import copy
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..bank import MIXTURE_INITS, Mixture, Schedule, TemplateBank, cyclic_order, order_logits
from ..blocks import batch_norm
from .isometric import IsoMixNet

__all__ = ['TaskPath', 'MultiTaskIsoMix', 'count_params']


def count_params(module_or_params: Union[nn.Module, Iterable[nn.Parameter]], trainable_only: bool = False) -> int:
    """Number of distinct parameter elements (shared tensors counted once)."""
    params = module_or_params.parameters() if isinstance(module_or_params, nn.Module) else module_or_params
    seen = {}
    for p in params:
        if not trainable_only or p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())


class TaskPath(nn.Module):
    """What one task owns: stem statistics, schedules (mixture logits + layer statistics), head; optionally
    a patch (its own BatchNorm scale and shift) and a trunk (its own stem and bank)."""

    def __init__(
            self,
            stem_stats: nn.BatchNorm2d,
            schedules: Sequence[Schedule],
            head: nn.Linear,
            patch_stem: Optional[nn.Parameter] = None,
            patch_layers: Optional[nn.Parameter] = None,
            stem: Optional[nn.Module] = None,
            bank: Optional[TemplateBank] = None,
    ):
        super().__init__()
        self.stem_stats = stem_stats
        self.schedules = nn.ModuleList(schedules)
        self.head = head
        # patch_stem: (2, C) scale and shift of the stem's BatchNorm; patch_layers: (L, A) every layer's
        # scale and shift in the bank's affine layout. None: the shared stem's and the bank's (mixed) ones.
        self.register_parameter('patch_stem', patch_stem)
        self.register_parameter('patch_layers', patch_layers)
        self.register_module('stem', stem)  # None: the model's shared stem and bank
        self.register_module('bank', bank)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def has_patch(self) -> bool:
        return self.patch_layers is not None

    def alpha(self) -> torch.Tensor:
        """Mixture weights (L, K) of all the layers this task runs."""
        return torch.cat([s.mixture.alpha() for s in self.schedules], 0)

    def mixture_logits(self, shared: Optional[Mixture] = None) -> List[nn.Parameter]:
        """The logits of this path's mixtures, except `shared` (the model's shared mixture)."""
        return [s.mixture.logits for s in self.schedules if s.mixture is not shared]

    def norm_stats(self) -> List[nn.modules.batchnorm._BatchNorm]:
        """Every BatchNorm holding this task's running statistics (stem and layers)."""
        return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.affine]


class MultiTaskIsoMix(nn.Module):
    """One shared stem and bank, one `TaskPath` per task; `model(x, task=name)`."""

    def __init__(
            self,
            trunk: IsoMixNet,
            tasks: Dict[str, int],
            share_from: Optional[int] = None,
            init_logit: Optional[float] = None,
            mixture_init: Optional[str] = None,
    ):
        """
        Args:
            trunk: an isometric isomix model with a learnable mixture; its stem and bank are taken
                (shared, not copied), its mixture logits and statistics seed every new task.
            tasks: task name -> number of classes.
            share_from: layers from this index on share one mixture across tasks (None: no sharing;
                0: every layer, a hard-shared trunk with per-task statistics).
            init_logit: if given, tasks start from the cyclic order with this logit (a soft start
                from which mixtures can move) instead of the trunk's logits.
            mixture_init: 'uniform' or 'random' (bank.MIXTURE_INITS): each new task (and the shared
                mixture) draws its own logits, so no common start decides which templates tasks share;
                'cyclic' is the cyclic start with `init_logit`. None: the seeds above.
        """
        super().__init__()
        mixture = trunk.schedule.mixture
        if mixture.is_hard:
            raise ValueError('the trunk runs a hard order; multi-task mixtures need learnable logits '
                             '(build the trunk without `order`)')
        if mixture_init is not None and mixture_init not in MIXTURE_INITS:
            raise ValueError(f'unknown mixture_init {mixture_init!r}; expected None or one of {MIXTURE_INITS}')
        depth, k = mixture.num_layers, mixture.num_templates
        if share_from is not None and not 0 <= share_from <= depth:
            raise ValueError(f'share_from must be a layer index in 0..{depth}, got {share_from}')
        self.depth, self.num_templates, self.temperature = depth, k, mixture.temperature
        self.share_from = share_from if share_from is not None and share_from < depth else None
        self.mixture_init = None if mixture_init == 'cyclic' else mixture_init
        self.num_features = trunk.num_features
        self.stem = trunk.stem
        self.bank = trunk.bank
        self.layer_fn = trunk.schedule.layer_fn
        self.pool = trunk.global_pool
        # Seeds for new tasks: the trunk's logits (or a soft cyclic start) and statistics.
        logits = mixture.logits.detach().clone()
        if init_logit is not None or mixture_init == 'cyclic':
            logit = init_logit if init_logit is not None else mixture.init_logit
            logits = order_logits(cyclic_order(depth, k), k, logit).to(logits)
        # Plain tensors and state dicts, not submodules: seeds are no part of the model's state.
        self._seed_logits = logits
        self._seed_stem_state = {k: v.detach().clone() for k, v in _stats_of(trunk.stem.bn).state_dict().items()}
        self._seed_layer_states = [{k: v.detach().clone() for k, v in layer.state_dict().items()}
                                   for layer in trunk.schedule.layers]
        self.shared_mixture = None
        if self.share_from is not None:
            self.shared_mixture = self._mixture(self.share_from, depth, logits if self.mixture_init is None else None)
        self.tasks = nn.ModuleDict()
        for name, num_classes in tasks.items():
            self.add_task(name, num_classes)

    # --- tasks ------------------------------------------------------------------------------
    def _mixture(self, start: int, end: int, logits: Optional[torch.Tensor]) -> Mixture:
        """Layers start..end-1's mixture: `logits`' rows, or (None) its own draw of `mixture_init`."""
        # On the bank's device: the seeds stay where the trunk was built, the model may have moved since.
        m = Mixture(end - start, self.num_templates, temperature=self.temperature, init=self.mixture_init or 'cyclic',
                    device=self.bank.weight.device, dtype=self.bank.weight.dtype)
        if logits is not None:
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
            patch: bool = False,
            own_trunk: bool = False,
    ) -> TaskPath:
        """Add a task to a (trained) model.

        Args:
            name: the new task's name.
            num_classes: classes of its head.
            init_from: start its mixture logits, statistics (and patch, if both have one) from this
                task's (default: the seeds).
            share_head_with: use this task's head (the same module: e.g. one classifier for several domains).
            share_trunk_with: use this task's stem statistics, schedules and patch (the same modules): a
                hard-shared trunk, only the head is the new task's own.
            patch: the task owns its BatchNorm scale and shift (stem and layers), starting from the
                ones it would otherwise run (the stem's, and its mixture of the bank's).
            own_trunk: the task runs its own copy of the stem and bank as they are now (independent networks).
        """
        if not isinstance(name, str) or not name or '.' in name or name in self.tasks:
            raise ValueError(f'task name must be a new non-empty string without ".", got {name!r} '
                             f'(existing tasks: {list(self.tasks)})')
        if int(num_classes) < 1:
            raise ValueError(f'task {name!r} needs at least one class, got num_classes={num_classes}')
        for other in (init_from, share_head_with, share_trunk_with):
            if other is not None:
                self._path(other)
        if share_trunk_with is not None and (patch or own_trunk or init_from is not None):
            raise ValueError(f'task {name!r}: share_trunk_with takes the whole trunk of {share_trunk_with!r}; '
                             f'it cannot be combined with patch, own_trunk or init_from')
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
            path = TaskPath(src.stem_stats, list(src.schedules), head, src.patch_stem, src.patch_layers,
                            src.stem, src.bank)
        else:
            path = self._new_path(init_from, head, own_trunk)
            if patch:
                self._add_patch(path, self.tasks[init_from] if init_from is not None else None)
        path.train(self.training)
        self.tasks[name] = path
        return path

    def _new_path(self, init_from: Optional[str], head: nn.Linear, own_trunk: bool) -> TaskPath:
        if init_from is not None:
            src = self.tasks[init_from]
            logits = torch.cat([s.mixture.logits.detach() for s in src.schedules], 0)
            stem_state = src.stem_stats.state_dict()
            layers = [layer.state_dict() for s in src.schedules for layer in s.layers]
        else:
            logits = self._seed_logits if self.mixture_init is None else None
            stem_state, layers = self._seed_stem_state, self._seed_layer_states
        own = self.share_from if self.share_from is not None else self.depth
        schedules = []
        if own > 0:
            schedules.append(self._schedule(self._mixture(0, own, logits), layers[:own]))
        if self.shared_mixture is not None:
            schedules.append(self._schedule(self.shared_mixture, layers[own:]))
        stem_stats = _stats_of(self.stem.bn)
        stem_stats.load_state_dict(stem_state)
        stem = bank = None
        if own_trunk:
            src = self.tasks[init_from] if init_from is not None else None
            stem = copy.deepcopy(self._stem(src))
            bank = copy.deepcopy(self._bank(src))
        return TaskPath(stem_stats, schedules, head, stem=stem, bank=bank)

    @torch.no_grad()
    def _add_patch(self, path: TaskPath, src: Optional[TaskPath]) -> None:
        """Give `path` its own BatchNorm scale and shift: `src`'s patch if it has one, else what `path` runs now."""
        if src is not None and src.has_patch:
            stem_rows, layer_rows = src.patch_stem.detach().clone(), src.patch_layers.detach().clone()
        else:
            bn, bank = self._stem(path).bn, self._bank(path)
            stem_rows = torch.stack([bn.weight.detach(), bn.bias.detach()])
            layer_rows = path.alpha().to(bank.affine) @ bank.affine.detach()
        path.patch_stem = nn.Parameter(stem_rows.clone())
        path.patch_layers = nn.Parameter(layer_rows.clone())

    def _path(self, task: str) -> TaskPath:
        if task not in self.tasks:
            raise KeyError(f'unknown task {task!r}; this model has tasks {list(self.tasks)}')
        return self.tasks[task]

    def _stem(self, path: Optional[TaskPath]) -> nn.Module:
        return path.stem if path is not None and path.stem is not None else self.stem

    def _bank(self, path: Optional[TaskPath]) -> TemplateBank:
        return path.bank if path is not None and path.bank is not None else self.bank

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

    def used_parameters(self, task: Optional[str] = None) -> List[nn.Parameter]:
        """The distinct parameters `task`'s forward uses (None: any task's): stem, bank, its path."""
        names = [task] if task is not None else list(self.tasks)
        out = {}
        for name in names:
            path = self._path(name)
            stem, bank = self._stem(path), self._bank(path)
            # a patched task runs its own scale and shift instead of the bank's and the stem's
            unused = {id(bank.affine), id(stem.bn.weight), id(stem.bn.bias)} if path.has_patch else set()
            for module in (stem, bank, path):
                for p in module.parameters():
                    if id(p) not in unused:
                        out[id(p)] = p
        return list(out.values())

    def task_parameters(self, task: str) -> List[nn.Parameter]:
        """The parameters only this task uses (no other task's forward touches them): its own mixture
        logits, head and patch; its stem and bank too when it runs them alone (own_trunk, or a one-task model)."""
        others = {id(p) for other in self.tasks if other != task for p in self.used_parameters(other)}
        return [p for p in self.used_parameters(task) if id(p) not in others]

    def param_counts(self) -> Dict[str, object]:
        """Parameter counts, each shared tensor once: 'total' (what the tasks use), 'shared' (used by more
        than one task), 'own' per task, and 'used' per task (everything its forward touches: its network's size)."""
        own = {t: count_params(self.task_parameters(t)) for t in self.tasks}
        total = count_params(self.used_parameters())
        return {'total': total, 'shared': total - sum(own.values()), 'own': own,
                'used': {t: count_params(self.used_parameters(t)) for t in self.tasks}}

    def task_state_dict(self, task: str) -> Dict[str, torch.Tensor]:
        """One task's checkpoint: its mixtures (incl. the shared one), statistics, patch and head (and own trunk)."""
        return {k: v.detach().clone() for k, v in self._path(task).state_dict().items()}

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'*mixture.logits', 'bank.affine', 'stem.bn.*', '*patch_*', 'tasks.*.bank.affine', 'tasks.*.stem.bn.*'}

    # --- forward ----------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, task: str) -> torch.Tensor:
        path = self._path(task)
        stem, bank = self._stem(path), self._bank(path)
        x = stem.conv(x)
        if path.patch_stem is not None:
            x = stem.act(batch_norm(x, path.stem_stats, path.patch_stem[0], path.patch_stem[1]))
        else:
            x = stem.act(batch_norm(x, path.stem_stats, stem.bn.weight, stem.bn.bias))
        start = 0
        for schedule in path.schedules:
            if path.patch_layers is None:
                x = schedule(x, bank)
            else:
                x = _run_patched(schedule, x, bank, path.patch_layers[start:start + schedule.num_layers])
            start += schedule.num_layers
        return x

    def forward_head(self, x: torch.Tensor, task: str, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        return x if pre_logits else self._path(task).head(x)

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, task), task)


def _run_patched(schedule: Schedule, x: torch.Tensor, bank: TemplateBank, affine: torch.Tensor) -> torch.Tensor:
    """A schedule's layers with the mixed kernels of its mixture and the task's own scale and shift rows."""
    if schedule.mixture.is_hard:
        raise ValueError('a patched task needs a soft mixture (one kernel row per layer), not a hard order')
    weight, _ = schedule.mixture(bank.weight, bank.affine)
    for layer, params in zip(schedule.layers, bank.unflatten_rows(weight, affine, schedule.num_layers)):
        x = layer(x, params)
    return x


def _stats_of(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """An affine-free BatchNorm holding a copy of `bn`'s running statistics."""
    stats = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=False,
                           device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    stats.load_state_dict({k: v for k, v in bn.state_dict().items() if k not in ('weight', 'bias')})
    return stats
