"""Multi-task training over one bank: a typed config, the model it describes, and the run.

    config = read_task_config('hparams/multitask_digits.yaml')   # or MultiTaskConfig(tasks=[...], ...)
    results = train_tasks(config)

`train.py --tasks FILE` translates its flags into the same config (`config_from_flags`) by timm's rule for
`-c`: a flag given on the command line overrides the task file, the task file overrides the flags' defaults
(and the values of a `-c` file, which set those defaults), and a flag's default fills in what the file leaves out.

Routing Networks: `model_kwargs` with `routing` ('task' or 'input'; with `router` and `router_args`, or train.py's
`--routing --router --router-*` flags) makes the model a `RoutedMultiTask` (models/routed_multitask.py): one routed trunk,
a head per task, the router trained at `router_lr`; the run then writes route frequencies instead of mixtures.
"""
import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union, get_args, get_origin, get_type_hints

import timm
import torch
import yaml
from timm.utils import get_outdir, update_summary

from ..models.isometric import IsoMixNet
from ..models.resnet import IsoMixResNet
from ..models.multitask import MultiTaskIsoMix
from ..train.config import yaml_problem
from ..train.datasets import prepare_dataset
from ..train.distributed import finish_distributed, setup_distributed
from ..train.files import atomic_save, atomic_write_bytes
from ..train.plots import js_sharing, plot_sharing, plot_task_mixtures
from .data import load_task_data
from .fit import fit_tasks
from ..models.routed_multitask import RoutedMultiTask, build_routed_task_model
from .route_usage import plot_route_usage, route_usage
from .train_adapters import check_adapter_config, train_adapters

__all__ = [
    'TaskSpec', 'MultiTaskConfig', 'VARIANTS', 'read_task_config', 'config_from_flags', 'build_task_model',
    'load_task_model', 'train_tasks', 'is_routed',
]

_logger = logging.getLogger(__name__)


@dataclass
class TaskSpec:
    """One task: its name, its dataset (an ImageFolder path, or a name in the config's `data_dir`), its classes."""
    name: str
    data: str
    classes: Union[int, List[str]]
    train_limit: Optional[int] = None
    val_limit: Optional[int] = None
    mode: Optional[str] = None           # with a config `backbone`: what learns (train_adapters.ADAPTER_MODES)

    @property
    def num_classes(self) -> int:
        return self.classes if isinstance(self.classes, int) else len(self.classes)


@dataclass
class MultiTaskConfig:
    """Everything a multi-task run needs (the keys of a task YAML file)."""
    tasks: List[TaskSpec]
    model: str = 'isomix_iso_64_8_p2'
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    share_from: Optional[int] = None     # layers from this index on share one mixture across tasks (0: all)
    init_logit: Optional[float] = 2.0    # soft cyclic start; None: the trunk's own logits
    mixture_init: Optional[str] = None   # 'uniform' / 'random': each task draws its own logits
    hard_shared: bool = False            # baseline: one trunk (statistics included), own heads
    patch: bool = False                  # each task owns its BatchNorm scale and shift (the model patch)
    independent: bool = False            # each task runs its own stem and bank (independent networks)
    share_head: bool = False             # one head for all tasks (domains of one label space)
    data_dir: Optional[str] = None       # folder of the tasks' datasets (or archives); None: $ISOMIX_DATA
    img_size: int = 32
    train_limit: Optional[int] = None    # images per task (seeded random subset); None: all
    val_limit: Optional[int] = None
    epochs: int = 3
    lr: float = 2e-3
    batch_size: int = 64
    opt: str = 'adamw'
    weight_decay: float = 0.05
    mixture_lr_mult: float = 10.
    router_lr: Optional[float] = None    # routed models (model_kwargs routing=...): the router's lr; None: lr
    warmup_epochs: int = 0
    seed: int = 42
    output: str = './output/train'
    experiment: str = ''                 # '' -> tasks-<file stem>-<model>
    device: Optional[str] = None         # None: CUDA when available, else CPU
    source: str = 'config'               # where the config came from (file stem names the experiment)
    backbone: Optional[str] = None       # a frozen backbone: each task trains alone in its mode, one adapter each

    def __post_init__(self):
        check_adapter_config(self)

    def to_dict(self) -> Dict[str, Any]:
        """Plain types only (stored in model.pth, loadable with weights_only=True)."""
        return dataclasses.asdict(self)


# The multi-task variants compared in the studies (config overrides), all trained with the same steps.
VARIANTS: Dict[str, Dict[str, Any]] = {
    'isomix': {},                                          # per-task mixtures, statistics and heads
    'shared_trunk': dict(share_from=0),                    # one mixture for all; per-task statistics and heads
    'model_patch': dict(share_from=0, patch=True),         # + per-task BatchNorm scale and shift (Mudrakarta)
    'independent': dict(independent=True),                 # a network per task
    'hard_shared': dict(hard_shared=True),                 # one trunk, statistics included; per-task heads
}

_FIELDS = {f.name for f in dataclasses.fields(MultiTaskConfig)}
_TASK_FIELDS = {f.name for f in dataclasses.fields(TaskSpec)}


_TYPE_NAMES = {int: 'an integer', float: 'a number', str: 'a string', bool: 'a boolean', dict: 'a mapping',
               list: 'a list', type(None): 'null'}


def _typed(where: str, key: str, value: Any, hint: Any) -> Any:
    """`value` as a field of type `hint` takes it (a number written as a string converted, as train.py reads
    YAML); ValueError naming the key and the type otherwise."""
    kinds = [get_origin(k) or k for k in (get_args(hint) if get_origin(hint) is Union else (hint,))]
    for kind in kinds:
        if kind is type(None) and value is None or kind in (bool, str, dict, list) and isinstance(value, kind):
            return value
        if kind in (int, float) and not isinstance(value, bool):
            if isinstance(value, kind) or kind is float and isinstance(value, int):
                return value
            if kind is int and isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                try:
                    return kind(value)
                except ValueError:
                    pass
    expected = ' or '.join(_TYPE_NAMES.get(k, getattr(k, '__name__', str(k))) for k in kinds)
    raise ValueError(f'{where}: {key!r} must be {expected}, got {value!r}')


def _config_from_dict(cfg: Dict[str, Any], where: str) -> MultiTaskConfig:
    if not isinstance(cfg, dict):
        raise ValueError(f'{where}: expected a mapping of settings, got {type(cfg).__name__}')
    unknown = sorted(set(cfg) - _FIELDS)
    if unknown:
        raise ValueError(f'{where}: unknown keys {unknown}; known keys: {sorted(_FIELDS)}')
    tasks = cfg.get('tasks')
    if not isinstance(tasks, list) or not tasks:
        raise ValueError(f'{where}: expected a non-empty list under "tasks", got {tasks!r}')
    specs = []
    for i, t in enumerate(tasks):
        t = dataclasses.asdict(t) if isinstance(t, TaskSpec) else t
        missing = [k for k in ('name', 'data', 'classes') if not isinstance(t, dict) or k not in t]
        if missing:
            raise ValueError(f'{where}: task #{i} lacks {missing} (each task needs name, data, classes)')
        extra = sorted(set(t) - _TASK_FIELDS)
        if extra:
            raise ValueError(f'{where}: task {t["name"]!r} has unknown keys {extra}; known: {sorted(_TASK_FIELDS)}')
        if not (isinstance(t['classes'], int) or isinstance(t['classes'], list)):
            raise ValueError(f'{where}: task {t["name"]!r}: classes must be a count or a list of names')
        hints = get_type_hints(TaskSpec)
        limits = {k: _typed(f'{where}: task {t["name"]!r}', k, t[k], hints[k]) for k in ('train_limit', 'val_limit')
                  if k in t}
        specs.append(TaskSpec(**{**t, **limits, 'name': str(t['name']), 'data': str(t['data'])}))
    names = [t.name for t in specs]
    if len(set(names)) != len(names):
        raise ValueError(f'{where}: task names repeat: {names}')
    hints = get_type_hints(MultiTaskConfig)
    values = {k: _typed(where, k, v, hints[k]) for k, v in cfg.items() if k != 'tasks' and
              (v is not None or k in ('share_from', 'init_logit', 'mixture_init', 'device'))}
    return MultiTaskConfig(**{**values, 'tasks': specs, 'model_kwargs': dict(cfg.get('model_kwargs') or {})})


def _read_task_file(path: Path) -> Any:
    """The YAML of a task file, with 'source' (the file's stem) set in a mapping."""
    if not path.is_file():
        raise FileNotFoundError(f'task file {path} does not exist')
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f'task file {path} is not valid YAML: {yaml_problem(e)}') from None
    except (UnicodeDecodeError, PermissionError) as e:
        raise ValueError(f'cannot read task file {path}: {e}') from None
    if isinstance(cfg, dict):
        cfg.setdefault('source', path.stem)
    return cfg


def read_task_config(path: Union[str, Path, Dict[str, Any], MultiTaskConfig]) -> MultiTaskConfig:
    """Read and check a task YAML (or an already-read mapping): `tasks` is a list of {name, data, classes}.

    Raises FileNotFoundError for a missing file and ValueError for a file that is not YAML or a key that is wrong.
    """
    if isinstance(path, MultiTaskConfig):
        return path
    if isinstance(path, dict):
        return _config_from_dict(path, '<config>')
    return _config_from_dict(_read_task_file(Path(path)), str(path))


# train.py's flags that set a MultiTaskConfig field of the same name
_FLAG_FIELDS = ('model', 'data_dir', 'img_size', 'epochs', 'lr', 'batch_size', 'opt', 'weight_decay',
                'mixture_lr_mult', 'router_lr', 'warmup_epochs', 'output', 'experiment', 'device', 'seed')


def config_from_flags(args: argparse.Namespace, given: Iterable[str] = ()) -> MultiTaskConfig:
    """train.py --tasks: the task file's config with train.py's flags, by timm's rule for `-c`.

    `given` names the flags (by dest) the command line gave itself (train.config.command_line_flags): those
    override the file; every other flag's value (its default, or a `-c` file's) only fills in what the file
    leaves out. Model kwargs follow the same rule per key: `--model-kwargs` and the router flags (folded into
    `routing`, `router` and `router_args` by train.config.fold_router_args; `router_args` key by key).
    """
    given = set(given)
    if isinstance(args.tasks, dict):
        in_file, where = args.tasks, '<config>'
    else:
        in_file, where = _read_task_file(Path(args.tasks)), str(args.tasks)
    config = _config_from_dict(in_file, where)
    for name in _FLAG_FIELDS:
        value = getattr(args, name, None)
        if value not in (None, '') and (name in given or in_file.get(name) is None):
            setattr(config, name, value)
    for key, value in (getattr(args, 'model_kwargs', None) or {}).items():
        file_value = config.model_kwargs.get(key)
        if key == 'router_args' and isinstance(file_value, dict):
            from_command_line = {k: v for k, v in value.items() if f'router_{k}' in given}
            config.model_kwargs[key] = {**value, **file_value, **from_command_line}
        elif key not in config.model_kwargs or (key in given if key in ('routing', 'router')
                                                 else 'model_kwargs' in given):
            config.model_kwargs[key] = value
    return config


def is_routed(config: MultiTaskConfig) -> bool:
    """Whether the config asks for Routing Networks (`routing` in its model kwargs)."""
    return config.model_kwargs.get('routing') is not None


def _build_routed(config: MultiTaskConfig) -> RoutedMultiTask:
    """The routed multi-task model: the mixture-model controls have no meaning for it, so they are refused."""
    controls = {'share_from': config.share_from is not None, 'mixture_init': config.mixture_init is not None,
                'hard_shared': config.hard_shared, 'patch': config.patch, 'independent': config.independent,
                'share_head': config.share_head}
    bad = [k for k, on in controls.items() if on]
    if bad:
        routing = config.model_kwargs['routing']
        raise ValueError(f'{bad} are mixture-model options; a routed model (routing={routing!r}) shares one '
                         'routed trunk and has a head per task: remove them or remove routing')
    if 'num_tasks' in config.model_kwargs:
        raise ValueError('model_kwargs num_tasks: a routed multi-task model takes its number of tasks from "tasks"')
    return build_routed_task_model(config.model, {t.name: t.num_classes for t in config.tasks}, **config.model_kwargs)


def build_task_model(config: Union[MultiTaskConfig, Dict[str, Any]]) -> Union[MultiTaskIsoMix, RoutedMultiTask]:
    """The multi-task model a config describes (`model`, `model_kwargs`, `tasks`, `share_from`, `init_logit`,
    `mixture_init`, and the controls `hard_shared` (one trunk, own heads), `patch` (own BatchNorm scale and
    shift), `independent` (own stem and bank) or `share_head` (one head)).

    With `routing` in `model_kwargs`, a `RoutedMultiTask` (Routing Networks; `init_logit` does not apply,
    the mixture controls raise ValueError)."""
    config = read_task_config(config)
    if is_routed(config):
        return _build_routed(config)
    if config.router_lr is not None:
        raise ValueError(f'router_lr {config.router_lr} needs a routed model: add routing (task or input) to '
                         'model_kwargs (or train.py --routing)')
    if config.hard_shared and (config.patch or config.independent):
        raise ValueError('hard_shared (one trunk for all tasks) excludes patch and independent')
    trunk = timm.create_model(config.model, num_classes=0, **config.model_kwargs)
    if not isinstance(trunk, (IsoMixNet, IsoMixResNet)):
        raise ValueError(f'multi-task models need an isomix trunk (isomix_iso_*, isomix_resnet*), got {config.model!r}')
    model = MultiTaskIsoMix(trunk, {}, share_from=config.share_from, init_logit=config.init_logit,
                            mixture_init=config.mixture_init)
    first = config.tasks[0].name
    for i, t in enumerate(config.tasks):
        model.add_task(t.name, t.num_classes, share_trunk_with=first if i and config.hard_shared else None,
                       share_head_with=first if i and config.share_head else None,
                       patch=config.patch,
                       own_trunk=bool(i) and config.independent)
    return model


def load_task_model(path: Union[str, Path], map_location: str = 'cpu') -> Union[MultiTaskIsoMix, RoutedMultiTask]:
    """Rebuild a trained multi-task model (routed or not) from the `model.pth` that train_tasks writes."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    model = build_task_model(ckpt['config'])
    model.load_state_dict(ckpt['state_dict'])
    return model


def _task_datasets(config: MultiTaskConfig):
    train_sets, val_sets = {}, {}
    for t in config.tasks:
        root = prepare_dataset(t.data, config.data_dir)
        limit_tr = t.train_limit if t.train_limit is not None else config.train_limit
        limit_val = t.val_limit if t.val_limit is not None else config.val_limit
        train_sets[t.name] = load_task_data(root, 'train', t.classes, config.img_size, limit_tr, config.seed, t.name)
        val_sets[t.name] = load_task_data(root, 'val', t.classes, config.img_size, limit_val, config.seed, t.name)
    return train_sets, val_sets


def _write_routes(model: RoutedMultiTask, val_sets, out_dir: Path, results: dict, device) -> None:
    """Route frequencies (eval-mode argmax routes on the validation sets) per task x layer x template, their
    Jensen-Shannon sharing per layer, and the plots (routes.png, routes-sharing.png, routes-per-class-*.png)."""
    usage = route_usage(model, val_sets, device=device)
    results['routes'] = {t: v.tolist() for t, v in usage['per_task'].items()}
    results['js_per_layer'] = usage['js_per_layer'].tolist()
    plot_route_usage(usage, out_dir)


def _write_outputs(model, config: MultiTaskConfig, out_dir: Path, results: dict, val_sets, device) -> None:
    atomic_save({'config': config.to_dict(), 'state_dict': model.state_dict()}, str(out_dir / 'model.pth'))
    if isinstance(model, RoutedMultiTask):  # no mixtures; a task's route depends on the shared router: no task files
        _write_routes(model, val_sets, out_dir, results, device)
        atomic_write_bytes(json.dumps(results, indent=1).encode(), str(out_dir / 'results.json'))
        return
    for t in model.tasks:
        atomic_save({'task': t, 'num_classes': model.tasks[t].num_classes,
                     'state_dict': model.task_state_dict(t)}, str(out_dir / f'task_{t}.pth'))
    alphas = model.alphas()
    results['js_per_layer'] = js_sharing(alphas).tolist()
    plot_task_mixtures(alphas, out_dir / 'mixtures.png', title=f'{config.model}: alpha per task')
    plot_sharing(alphas, out_dir / 'sharing.png')
    atomic_write_bytes(json.dumps(results, indent=1).encode(), str(out_dir / 'results.json'))


def train_tasks(config: Union[MultiTaskConfig, str, Path, Dict[str, Any]]) -> dict:
    """Train the config's tasks jointly; the entry point of `train.py --tasks`.

    Writes to `<output>/<experiment>` (a new folder, never an existing one): `model.pth` (everything),
    `task_<name>.pth` per task (its mixtures, statistics and head), `summary.csv`, `results.json`,
    `mixtures.png` (alpha per task x layer x template) and `sharing.png` (per-layer Jensen-Shannon). A routed
    model (Routing Networks) writes `model.pth`, `summary.csv`, `results.json` with `routes` (per task: route
    frequency per layer x template on the validation set) and `js_per_layer`, `routes.png`, `routes-sharing.png`
    (and `routes-per-class-<task>.png` for per-input routes).
    Runs under torchrun like single-task training (gloo on CPU, one sampler shard per rank). With a `backbone`, the
    tasks train one by one over it, frozen, and each is written as an adapter (tasks/train_adapters.py).
    """
    config = read_task_config(config)
    if config.backbone is not None:  # new tasks over a frozen backbone: one adapter each (tasks/train_adapters.py)
        return train_adapters(config)
    dist = argparse.Namespace(device=config.device, dist_backend=None, dist_url='env://')
    device = setup_distributed(dist)
    primary = getattr(dist, 'rank', 0) == 0
    if getattr(dist, 'distributed', False):
        _logger.info(f'Distributed: process {dist.rank} of {dist.world_size}, device {device}')
    torch.manual_seed(config.seed)  # the same initial model on every rank
    model = build_task_model(config).to(device)
    train_sets, val_sets = _task_datasets(config)
    out_dir = None
    if primary:
        exp = config.experiment or f'tasks-{config.source}-{config.model}'
        out_dir = Path(get_outdir(config.output or './output/train', exp, inc=True))
        _logger.info(f'writing to {out_dir}')

    def log(metrics):
        if primary:
            trained = {k: v for k, v in metrics.items() if 'train' in k or k == 'time'}  # time: the epoch's seconds
            update_summary(metrics['epoch'], trained,
                           {k: v for k, v in metrics.items() if k not in trained and k != 'epoch'},
                           str(out_dir / 'summary.csv'), write_header=metrics['epoch'] == 1)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()}), flush=True)

    history = fit_tasks(
        model, train_sets, val_sets if primary else None, epochs=config.epochs, lr=config.lr,
        batch_size=config.batch_size, opt=config.opt, weight_decay=config.weight_decay,
        mixture_lr_mult=config.mixture_lr_mult, warmup_epochs=config.warmup_epochs, device=device,
        seed=config.seed, distributed=getattr(dist, 'distributed', False), log_fn=log, router_lr=config.router_lr)
    counts = model.param_counts()
    results = {'model': config.model, 'tasks': [t.name for t in config.tasks], 'out_dir': str(out_dir),
               'params': counts['total'], 'history': history, 'task_params': counts['own'],
               'used_params': counts['used']}
    if primary:
        results['top1'] = {t.name: history[-1][f'{t.name}_top1'] for t in config.tasks}
        _write_outputs(model, config, out_dir, results, val_sets, device)
    finish_distributed(dist)
    return results
