"""Tasks (or domains) owning mixtures over one isomix backbone: the multi-task model and its controls.

The backbone is any isomix model: isometric (`IsoMixNet`: a patch stem, one bank) or staged (`IsoMixResNet`:
timm's ResNet stem, then per stage an unbanked first block and a bank). Its stem, unbanked blocks and banks are
shared by every task, under the backbone's own state-dict names (`stem.*`, `bank.*`; `conv1.*`, `bn1.*`,
`stages.<i>.first.*`, `stages.<i>.bank.*`). Each task owns a `TaskPath` (models/task_path.py): statistics for
every BatchNorm it runs, one `Schedule` per bank (its own mixture logits), a head, optionally a patch. With
`share_from=i` (one bank only), the layers from i on take their mixture from one `Mixture` shared by all tasks
(each task keeps its own statistics there). A task is saved alone as an adapter (`save_task` / `load_task`,
models/task_adapter.py) and baked into a plain timm network (`bake`, models/bake.py).

Where a task's mixture starts. The tasks given to the constructor run the backbone's schedule as it is: its
logits, or its hard order as sharp logits (SHARP_LOGIT: one-hot to float32 precision), so over a ResNet warm start
such a task computes the ResNet. A task added with `add_task` starts from its source's logits (`init_from`'s, else
the backbone's), except where they are a hard order or a warm start's sharp logits (exactly SHARP_LOGIT times the
temperature on one template per layer, 0 on the others): there the softmax has no gradient, and the task starts at
the same order with logit `init_logit` (default INIT_LOGIT = 4: alpha 0.98 on the order's template for K = 2,
0.93 for K = 5), from which its mixture learns.

`model(x, task=t)`: `t` is a task name, a list of one name per example, or a tensor of indices into
`list(model.tasks)`. A mixed batch is grouped by task (one stable sort), each task's path runs once on its group and
the results return in the batch's order (`bank.run_routed`, as for a router's templates); in eval without autograd
over an isometric backbone the tasks run side by side, one network of grouped convolutions (models/task_wide.py).
When the batch's tasks have heads of different sizes, `forward` returns (B, the largest head's classes), each row
padded with -inf beyond its task's classes: softmax gives those 0, argmax never picks them, and cross-entropy with
a task's labels is that task's loss. In eval without autograd each task's mixed rows are computed once and kept
until a parameter changes or the model trains again (`bank.Mixture`).

The controls that separate the mixtures from the normalization statistics are the same class:
  - `share_from=0`: one mixture for all tasks, i.e. a hard-shared trunk with per-task statistics and heads;
  - `add_task(patch=True)`: the task owns its BatchNorm scale and shift (stem, unbanked blocks and every layer),
    which replace the shared ones: with `share_from=0` the "model patch" of Mudrakarta et al. ("K for the Price
    of 1", ICLR 2019): shared kernels, per-task statistics, scale, shift and head;
  - `add_task(own_trunk=True)` (isometric): the task runs its own copy of the stem and bank (independent networks);
  - `add_task(share_trunk_with=...)`: one trunk, statistics included, for several tasks.
Parameters are counted over the tensors a task's forward uses (`used_parameters`), each shared tensor once; a
task's own parameters are those no other task uses (`task_parameters`).
"""
import copy
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bank import MIXTURE_INITS, Mixture, Schedule, TemplateBank, run_routed
from ..blocks import batch_norm
from .bake import bake_task
from .task_adapter import backbone_data_config, backbone_info, fingerprint as _fingerprint, \
    load_task as _load_task, save_task as _save_task
from .isometric import IsoMixNet
from .resnet import IsoMixResNet
from .task_norms import BlockNorms, block_norms, run_block, stats_of
from .task_path import SharedStage, TaskPath, Tasks, count_params, route_tasks, run_patched, seed_logits, start_logits
from .task_wide import SideBySide

__all__ = ['TaskPath', 'MultiTaskIsoMix', 'count_params', 'Tasks']


class MultiTaskIsoMix(nn.Module):
    """One isomix backbone's stem, unbanked blocks and banks shared by tasks, one `TaskPath` per task;
    `model(x, task=t)`."""

    def __init__(
            self,
            backbone: Union[IsoMixNet, IsoMixResNet],
            tasks: Dict[str, int],
            share_from: Optional[int] = None,
            init_logit: Optional[float] = None,
            mixture_init: Optional[str] = None,
    ):
        """
        Args:
            backbone: an isomix model, isometric or staged (not routed: models/routed_multitask.py); its stem,
                unbanked blocks and banks are taken (shared, not copied), its schedule (mixture logits, or a hard
                order as sharp logits) and statistics seed every task.
            tasks: task name -> number of classes; these run the backbone's schedule as it is (module docstring).
            share_from: layers from this index on share one mixture across tasks (None: no sharing;
                0: every layer, a hard-shared trunk with per-task statistics). Backbones with one bank only.
            init_logit: if given, the seed is the backbone's hard order, else the cyclic order, with this logit
                (a soft start from which mixtures can move) instead of the backbone's logits.
            mixture_init: 'uniform' or 'random' (bank.MIXTURE_INITS): each new task (and the shared
                mixture) draws its own logits, so no common start decides which templates tasks share;
                'cyclic' is the cyclic start with `init_logit`. None: the seeds above.
        """
        super().__init__()
        if mixture_init is not None and mixture_init not in MIXTURE_INITS:
            raise ValueError(f'unknown mixture_init {mixture_init!r}; expected None or one of {MIXTURE_INITS}')
        schedules = self._take_backbone(backbone)
        mixtures = [s.mixture for s in schedules]
        self.bank_layers = [m.num_layers for m in mixtures]
        self.depth, self.temperature = sum(self.bank_layers), mixtures[0].temperature
        if share_from is not None and (self.staged or not 0 <= share_from <= self.depth):
            raise ValueError(f'share_from must be a layer index in 0..{self.depth} of a backbone with one bank, got '
                             f'{share_from} ({len(mixtures)} banks)')
        self.share_from = share_from if share_from is not None and share_from < self.depth else None
        self.mixture_init = None if mixture_init == 'cyclic' else mixture_init
        self.num_features = backbone.num_features
        self.layer_fns = [s.layer_fn for s in schedules]
        self.pool = backbone.global_pool
        self.backbone_info = backbone_info(backbone)  # architecture and kwargs, for adapters
        self.data_config = backbone_data_config(backbone)
        self.task_info: Dict[str, dict] = {}  # per task: label names, data config, results (adapters)
        self.side_by_side = SideBySide()  # mixed batches in eval (models/task_wide.py; .enabled)
        # Seeds for tasks: the backbone's logits (a hard order: sharp logits), or a soft start, and statistics.
        # Plain tensors and state dicts, not submodules: seeds are no part of the model's state.
        init_logit = mixtures[0].init_logit if init_logit is None and mixture_init == 'cyclic' else init_logit
        self._seed_logits = logits = seed_logits(mixtures, init_logit)
        conv, bn, act, pool = self._stem_parts(None)
        self._seed_stem_state = {k: v.detach().clone() for k, v in stats_of(bn).state_dict().items()}
        self._seed_layer_states = [[{k: v.detach().clone() for k, v in layer.state_dict().items()}
                                    for layer in s.layers] for s in schedules]
        self._seed_block_states = [BlockNorms(block).state_dict() for block in self._firsts()]
        self.shared_mixture = None
        if self.share_from is not None:
            self.shared_mixture = self._mixture(0, self.share_from, self.depth,
                                                logits[0] if self.mixture_init is None else None)
        self.tasks = nn.ModuleDict()
        for name, num_classes in tasks.items():
            self._add(name, num_classes, backbone_task=True)

    def _take_backbone(self, backbone: nn.Module) -> List[Schedule]:
        """Register the backbone's shared modules under its own names; return its schedules (the seeds)."""
        self.staged = isinstance(backbone, IsoMixResNet)
        if isinstance(backbone, IsoMixNet):
            if backbone.router is not None:
                raise ValueError('a routed backbone has no mixtures: use models/routed_multitask.RoutedMultiTask')
            self.stem, self.bank = backbone.stem, backbone.bank
            return [backbone.schedule]
        if self.staged:
            if any(s.router is not None for s in backbone.stages):
                raise ValueError('a routed backbone has no mixtures: its routers choose the templates')
            for s in backbone.stages:
                block_norms(s.first)  # raises for a block without per-task norms
            self.conv1, self.bn1, self.act1, self.maxpool = backbone.conv1, backbone.bn1, backbone.act1, backbone.maxpool
            self.stages = nn.ModuleList([SharedStage(s.first, s.bank) for s in backbone.stages])
            return [s.schedule for s in backbone.stages]
        raise ValueError(f'a multi-task model needs an isomix backbone (IsoMixNet or IsoMixResNet, e.g. '
                         f'timm.create_model("isomix_resnet50", num_classes=0)), got {type(backbone).__name__}')

    # --- the shared modules -----------------------------------------------------------------------
    def _stem_parts(self, path: Optional[TaskPath]) -> Tuple[nn.Module, nn.BatchNorm2d, nn.Module, Optional[nn.Module]]:
        """(conv, BatchNorm, act, pool or None) of the stem `path` runs."""
        if self.staged:
            return self.conv1, self.bn1, self.act1, self.maxpool
        stem = path.stem if path is not None and path.stem is not None else self.stem
        return stem.conv, stem.bn, stem.act, None

    def _firsts(self) -> List[nn.Module]:
        """The unbanked blocks, one per stage ([] for an isometric backbone)."""
        return [s.first for s in self.stages] if self.staged else []

    def banks(self) -> List[TemplateBank]:
        """The shared banks, one per stage of a staged backbone, one for an isometric one."""
        return [s.bank for s in self.stages] if self.staged else [self.bank]

    def _bank_for(self, path: Optional[TaskPath], i: int) -> TemplateBank:
        """The bank schedule `i` of `path` runs over (a task's own trunk, a stage's bank, or the one bank)."""
        if path is not None and path.bank is not None:
            return path.bank
        return self.stages[i].bank if self.staged else self.bank

    def _trunk_modules(self, path: TaskPath) -> List[nn.Module]:
        if self.staged:
            return [self.conv1, self.bn1, *self.stages]
        return [path.stem if path.stem is not None else self.stem, self._bank_for(path, 0)]

    def trunk_parameters(self, task: str) -> List[nn.Parameter]:
        """The shared (or own-trunk) parameters `task` runs: stem, unbanked blocks and banks (full fine-tuning)."""
        return [p for m in self._trunk_modules(self._path(task)) for p in m.parameters()]

    # --- tasks ------------------------------------------------------------------------------------
    def _mixture(self, bank: int, start: int, end: int, logits: Optional[torch.Tensor]) -> Mixture:
        """Layers start..end-1 of bank `bank`: `logits`' rows, or (None) its own draw of `mixture_init`."""
        # On the bank's device: the seeds stay where the backbone was built, the model may have moved since.
        weight = self.banks()[bank].weight
        m = Mixture(end - start, self.banks()[bank].num_templates, temperature=self.temperature,
                    init=self.mixture_init or 'cyclic', device=weight.device, dtype=weight.dtype)
        if logits is not None:
            with torch.no_grad():
                m.logits.copy_(logits[start:end])
        return m

    def _schedule(self, bank: int, mixture: Mixture, layer_states: Sequence[dict]) -> Schedule:
        weight = self.banks()[bank].weight
        s = Schedule(self.layer_fns[bank], mixture, device=weight.device, dtype=weight.dtype)
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
            init_logit: Optional[float] = None,
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
            patch: the task owns its BatchNorm scale and shift (stem, unbanked blocks and layers), starting from
                the ones it would otherwise run (the shared ones, and its mixture of the banks').
            own_trunk: the task runs its own copy of the stem and bank as they are now (independent networks;
                isometric backbones).
            init_logit: start at the source's order (the argmax of its mixture) with this logit. None: the
                source's logits, or INIT_LOGIT where they are sharp (a hard order or a warm start; module docstring).
        """
        return self._add(name, num_classes, init_from, share_head_with, share_trunk_with, patch, own_trunk,
                         init_logit)

    def _add(self, name, num_classes, init_from=None, share_head_with=None, share_trunk_with=None, patch=False,
             own_trunk=False, init_logit=None, backbone_task=False) -> TaskPath:
        """add_task; `backbone_task`: a constructor's task, which runs the backbone's schedule as it is."""
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
        if own_trunk and self.staged:
            raise ValueError(f'task {name!r}: own_trunk (independent networks) needs an isometric backbone')
        weight = self.banks()[0].weight
        if share_head_with is not None:
            head = self.tasks[share_head_with].head
            if head.out_features != num_classes:
                raise ValueError(f'task {name!r} has {num_classes} classes but the head of {share_head_with!r} '
                                 f'it should share has {head.out_features}')
        else:
            head = nn.Linear(self.num_features, num_classes, device=weight.device, dtype=weight.dtype)
        if share_trunk_with is not None:
            src = self.tasks[share_trunk_with]
            path = TaskPath(src.stem_stats, list(src.schedules), head, src.patch_stem, src.patch_layers,
                            src.stem, src.bank, list(src.blocks))
        else:
            path = self._new_path(init_from, head, own_trunk, None if backbone_task else init_logit, backbone_task)
            if patch:
                self._add_patch(path, self.tasks[init_from] if init_from is not None else None)
        path.train(self.training)
        self.tasks[name] = path
        return path

    def _per_bank(self, path: TaskPath) -> List[List[Schedule]]:
        """The path's schedules grouped by the bank they run over (one group for an isometric backbone)."""
        return [[s] for s in path.schedules] if self.staged else [list(path.schedules)]

    def _new_path(self, init_from: Optional[str], head: nn.Linear, own_trunk: bool, init_logit: Optional[float],
                  backbone_task: bool) -> TaskPath:
        if init_from is not None:
            src = self.tasks[init_from]
            groups = self._per_bank(src)
            logits = [torch.cat([s.mixture.logits.detach() for s in g], 0) for g in groups]
            stem_state = src.stem_stats.state_dict()
            layers = [[layer.state_dict() for s in g for layer in s.layers] for g in groups]
            block_states = [b.state_dict() for b in src.blocks]
        else:
            logits = self._seed_logits if self.mixture_init is None else [None] * len(self._seed_logits)
            stem_state, layers, block_states = self._seed_stem_state, self._seed_layer_states, self._seed_block_states
        if not backbone_task:
            logits = [l if l is None else start_logits(l, self.temperature, init_logit) for l in logits]
        schedules = []
        for i, (bank_logits, bank_layers) in enumerate(zip(logits, layers)):
            own = self.share_from if self.share_from is not None else self.bank_layers[i]
            if own > 0:
                schedules.append(self._schedule(i, self._mixture(i, 0, own, bank_logits), bank_layers[:own]))
            if self.shared_mixture is not None:
                schedules.append(self._schedule(i, self.shared_mixture, bank_layers[own:]))
        stem_stats = stats_of(self._stem_parts(None)[1])
        stem_stats.load_state_dict(stem_state)
        blocks = []
        for block, state in zip(self._firsts(), block_states):
            blocks.append(BlockNorms(block))
            blocks[-1].load_state_dict({k: v for k, v in state.items() if k != 'patch_norms'})
        stem = bank = None
        if own_trunk:
            src = self.tasks[init_from] if init_from is not None else None
            stem = copy.deepcopy(src.stem if src is not None and src.stem is not None else self.stem)
            bank = copy.deepcopy(self._bank_for(src, 0))
        return TaskPath(stem_stats, schedules, head, stem=stem, bank=bank, blocks=blocks)

    @torch.no_grad()
    def _add_patch(self, path: TaskPath, src: Optional[TaskPath]) -> None:
        """Give `path` its own BatchNorm scale and shift: `src`'s patch if it has one, else what `path` runs now."""
        if src is not None and src.has_patch:
            stem_rows, layer_rows = src.patch_stem.detach().clone(), src.patch_layers.detach().clone()
            for block, mine, theirs in zip(self._firsts(), path.blocks, src.blocks):
                mine.set_patch(block, theirs.patch_norms)
        else:
            bn = self._stem_parts(path)[1]
            stem_rows = torch.stack([bn.weight.detach(), bn.bias.detach()])
            rows = []
            for i, group in enumerate(self._per_bank(path)):
                bank = self._bank_for(path, i)
                rows.append(torch.cat([s.mixture.alpha() for s in group], 0).to(bank.affine) @ bank.affine.detach())
            layer_rows = rows[0] if len(rows) == 1 else torch.cat([r.reshape(-1) for r in rows])
            for block, mine in zip(self._firsts(), path.blocks):
                mine.set_patch(block)
        path.patch_stem = nn.Parameter(stem_rows.clone())
        path.patch_layers = nn.Parameter(layer_rows.clone())

    def _patch_rows(self, path: TaskPath) -> List[torch.Tensor]:
        """Each schedule's (L, A) rows of the path's patch_layers (views: gradients reach the patch)."""
        sizes = [(s.num_layers, self._bank_for(path, i).affine.shape[1]) for i, s in enumerate(path.schedules)]
        flat = path.patch_layers.reshape(-1).split([l * a for l, a in sizes])
        return [f.view(l, a) for f, (l, a) in zip(flat, sizes)]

    def _path(self, task: str) -> TaskPath:
        if task not in self.tasks:
            raise KeyError(f'unknown task {task!r}; this model has tasks {list(self.tasks)}')
        return self.tasks[task]

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
        """Mixture weights (L, K) per task (banks of several K: each row padded with 0 to the largest)."""
        return {name: path.alpha().detach() for name, path in self.tasks.items()}

    def used_parameters(self, task: Optional[str] = None) -> List[nn.Parameter]:
        """The distinct parameters `task`'s forward uses (None: any task's): stem, blocks, banks, its path."""
        names = [task] if task is not None else list(self.tasks)
        out = {}
        for name in names:
            path = self._path(name)
            bn = self._stem_parts(path)[1]
            # a patched task runs its own scale and shift instead of the banks', the stem's and the blocks'
            unused = set() if not path.has_patch else {id(p) for p in (
                bn.weight, bn.bias, *(self._bank_for(path, i).affine for i in range(len(self.banks()))),
                *(p for b in self._firsts() for n in block_norms(b).values() for p in (n.weight, n.bias)))}
            for module in (*self._trunk_modules(path), path):
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

    # --- adapters and baking (models/task_adapter.py, models/bake.py) -------------------------------
    def fingerprint(self) -> str:
        """sha256 of the shared weights (models/task_adapter.py: `fingerprint`), as an adapter records it."""
        return _fingerprint(self.shared_parameters())

    def shared_parameters(self) -> Dict[str, nn.Parameter]:
        """The backbone's parameters every task runs over, by the backbone's own names: stem, unbanked blocks, banks."""
        return {n: p for n, p in self.named_parameters() if not n.startswith(('tasks.', 'shared_mixture.'))}

    def save_task(self, name: str, folder: str, **metadata) -> str:
        """Write task `name` as an adapter folder (adapter_config.json, adapter_model.safetensors); see
        models/task_adapter.py `save_task` for the metadata (label_names, data_config, results)."""
        return _save_task(self, name, folder, **metadata)

    def load_task(self, source: str, name: Optional[str] = None, allow_other_backbone: bool = False) -> TaskPath:
        """Add the task of an adapter folder or `hf-hub:ORG/NAME` (as `name`, default its own); a backbone whose
        fingerprint differs is refused unless `allow_other_backbone` (models/task_adapter.py `load_task`)."""
        return _load_task(self, source, name, allow_other_backbone)

    def bake(self, task: str) -> nn.Module:
        """Task `task`'s network as plain timm / torch modules, in eval mode (models/bake.py)."""
        return bake_task(self, task)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'*mixture.logits', 'bank.affine', 'stem.bn.*', '*patch_*', 'tasks.*.bank.affine', 'tasks.*.stem.bn.*',
                'stages.*.bank.affine'}

    # --- forward ----------------------------------------------------------------------------------
    def _features(self, x: torch.Tensor, path: TaskPath) -> torch.Tensor:
        conv, bn, act, pool = self._stem_parts(path)
        scale, shift = (path.patch_stem[0], path.patch_stem[1]) if path.patch_stem is not None else (bn.weight, bn.bias)
        x = act(batch_norm(conv(x), path.stem_stats, scale, shift))
        if pool is not None:
            x = pool(x)
        patches = self._patch_rows(path) if path.has_patch else None
        for i, schedule in enumerate(path.schedules):
            if path.blocks:
                x = run_block(self.stages[i].first, x, path.blocks[i])
            bank = self._bank_for(path, i)
            x = schedule(x, bank) if patches is None else run_patched(schedule, x, bank, patches[i])
        return x

    def _padded_head(self, index: torch.Tensor):
        """head(x, task name): that task's logits, padded with -inf to the largest head among `index`'s tasks."""
        width = max(list(self.tasks.values())[k].num_classes for k in index.unique().tolist())

        def head(x: torch.Tensor, name: str) -> torch.Tensor:
            y = self.tasks[name].head(x)
            return F.pad(y, (0, width - y.shape[1]), value=float('-inf')) if y.shape[1] < width else y
        return head

    def forward_features(self, x: torch.Tensor, task: Tasks) -> torch.Tensor:
        """The features of each example under its task (`task`: a name, names per example, or task indices)."""
        name, index = route_tasks(task, list(self.tasks), x.shape[0], x.device)
        if index is None:
            return self._features(x, self.tasks[name])
        wide = self.side_by_side(self, x, index)  # None where it does not apply (models/task_wide.py)
        return wide if wide is not None else run_routed(
            lambda g, n: self._features(g, self.tasks[n]), x, list(self.tasks), index)

    def forward_head(self, x: torch.Tensor, task: Tasks, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        if pre_logits:
            return x
        name, index = route_tasks(task, list(self.tasks), x.shape[0], x.device)
        return self.tasks[name].head(x) if index is None else run_routed(
            self._padded_head(index), x, list(self.tasks), index)

    def forward(self, x: torch.Tensor, task: Tasks) -> torch.Tensor:
        """Logits of each example under its task; a mixed batch with heads of several sizes is padded with -inf."""
        return self.forward_head(self.forward_features(x, task), task)
