"""Task adapters: one task of a `MultiTaskIsoMix` as a small folder that loads onto the same backbone.

    model.save_task('cifar10', 'adapters/cifar10')        # adapter_config.json + adapter_model.safetensors
    other.load_task('adapters/cifar10')                   # or 'hf-hub:ORG/NAME'

The two files follow PEFT's convention (one JSON config, one safetensors file, PEFT's names). The weights hold only
what the task owns: its mixture logits, the statistics of every BatchNorm it runs (stem, unbanked blocks, executed
layers), its patch (own BatchNorm scale and shift) if it has one, and its head; the backbone's stem, unbanked blocks
and banks are not in it. The config (`FORMAT`, version `FORMAT_VERSION`) names the task, its classes (count,
optional label names), what it owns (element counts per group), the backbone (architecture, the model kwargs that
rebuild it with `timm.create_model(architecture, num_classes=0, **model_args)`, a name, and the fingerprint of its
shared weights, see `FINGERPRINT`), the executed layers per bank, the mixtures' temperature, the data config (input
size, mean, std, interpolation, crop) and results. Loading refuses, with `_hub.PretrainedWeightsError` and its
subclasses: another architecture, another schedule depth, a truncated or corrupted file, a pickle (adapters are
read from safetensors only), and a backbone whose fingerprint differs (`BackboneMismatchError`, naming both; pass
`allow_other_backbone=True` for a backbone changed on purpose, e.g. fine-tuned).
"""
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ._hub import PICKLED_SUFFIXES, PickledWeightsError, PretrainedWeightsError, WeightsNotPublishedError, \
    _hub_download, check_state_dict, check_weights_file
from .isometric import IsoMixNet
from .resnet import IsoMixResNet

__all__ = ['FORMAT', 'FORMAT_VERSION', 'CONFIG_NAME', 'WEIGHTS_NAME', 'FINGERPRINT', 'BackboneMismatchError',
           'fingerprint', 'backbone_parameters', 'backbone_fingerprint', 'backbone_info', 'backbone_data_config',
           'save_task', 'read_adapter', 'load_task', 'publish_task_command']

FORMAT = 'timm_isomix.task_adapter'
FORMAT_VERSION = 1
CONFIG_NAME = 'adapter_config.json'
WEIGHTS_NAME = 'adapter_model.safetensors'
FINGERPRINT = ('sha256 over the backbone parameters every task runs over (stem, unbanked blocks, banks; no mixture '
               'logits, classifier, router or buffer), sorted by state-dict name; for each, the UTF-8 bytes of '
               '"<name>:<shape, comma-separated>\\n", then its values as little-endian float32 in C order')
DATA_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')


class BackboneMismatchError(PretrainedWeightsError):
    """An adapter trained over a backbone whose shared weights (fingerprint) differ from this model's."""


def publish_task_command(repo_id: str) -> str:
    return f'python -m timm_isomix.hub.publish --task FOLDER --repo-id {repo_id}'


# --- the backbone ---------------------------------------------------------------------------------
def fingerprint(named: Dict[str, torch.Tensor]) -> str:
    """'sha256:<hex>' of named tensors as `FINGERPRINT` says."""
    h = hashlib.sha256()
    for name in sorted(named):
        t = named[name].detach()
        h.update(f'{name}:{",".join(str(d) for d in t.shape)}\n'.encode())
        h.update(t.to('cpu', torch.float32).contiguous().numpy().astype('<f4', copy=False).tobytes())
    return 'sha256:' + h.hexdigest()


def backbone_parameters(backbone: nn.Module) -> Dict[str, torch.Tensor]:
    """A plain isomix backbone's shared parameters (what `MultiTaskIsoMix.shared_parameters` holds), by name."""
    classifier = backbone.get_classifier(name_only=True) + '.'
    return {n: p for n, p in backbone.named_parameters()
            if not n.endswith('mixture.logits') and not n.startswith(classifier)
            and not any(part in ('router', 'routers') for part in n.split('.'))}


def backbone_fingerprint(backbone: nn.Module) -> str:
    """The fingerprint of a plain isomix backbone, equal to a multi-task model's over it."""
    return fingerprint(backbone_parameters(backbone))


def backbone_info(backbone: nn.Module) -> Dict[str, Any]:
    """{'architecture', 'model_args', 'name'}: `timm.create_model(architecture, num_classes=0, **model_args)`
    builds a backbone of this shape and schedule; 'name' says where its weights came from (default: the
    architecture; `train.py --tasks` writes the backbone it was given)."""
    cfg = getattr(backbone, 'pretrained_cfg', None) or {}
    arch = cfg.get('architecture') or type(backbone).__name__
    args: Dict[str, Any] = {'in_chans': backbone.in_chans}
    if isinstance(backbone, IsoMixNet):
        args.update(width=backbone.num_features, num_templates=backbone.bank.num_templates,
                    patch_size=backbone.patch_size)
    elif isinstance(backbone, IsoMixResNet):
        args.update(layers=[1 + s.bank.num_templates for s in backbone.stages],
                    channels=[s.first.conv1.out_channels for s in backbone.stages])
    args.update(backbone.schedule_args())
    temperature = next(iter(backbone.mixtures().values())).temperature
    if temperature != 1.0:
        args['temperature'] = temperature
    return {'architecture': arch, 'model_args': args, 'name': arch}


def backbone_data_config(backbone: nn.Module) -> Dict[str, Any]:
    """The data config timm resolves for the backbone (its pretrained cfg): input size, mean, std, interpolation."""
    from timm.data import resolve_model_data_config
    return {k: v for k, v in resolve_model_data_config(backbone).items() if k in DATA_KEYS}


# --- save -------------------------------------------------------------------------------------------
def _owned(model, name: str) -> Dict[str, int]:
    """Elements of each group the task owns."""
    path = model._path(name)
    return {
        'mixtures': sum(s.mixture.logits.numel() for s in path.schedules),
        'statistics': sum(b.numel() for m in path.norm_stats() for b in (m.running_mean, m.running_var)),
        'patch': sum(p.numel() for p in path.patch_parameters()),
        'head': sum(p.numel() for p in path.head.parameters()),
    }


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def save_task(model, name: str, folder: str, label_names: Optional[list] = None,
              data_config: Optional[Dict[str, Any]] = None, results: Optional[Dict[str, Any]] = None) -> str:
    """Write task `name` of `model` to `folder` (created; its two adapter files replaced); return the folder.

    `label_names` (one per class), `data_config` (what the task's inputs look like; default: what was given or loaded
    before, else the backbone's) and `results` (e.g. {'top1': 91.2}, shown on the model card) go into the config.
    """
    path = model._path(name)
    if path.stem is not None or path.bank is not None:
        raise ValueError(f'task {name!r} runs its own trunk (own_trunk): it is a whole network, not an adapter; '
                         f'save the model instead')
    if model.shared_mixture is not None and any(s.mixture is model.shared_mixture for s in path.schedules):
        raise ValueError(f'task {name!r} runs the mixture all tasks share (share_from={model.share_from}); an adapter '
                         f'holds only what one task owns')
    info = model.task_info.get(name, {})
    label_names = label_names if label_names is not None else info.get('label_names')
    if label_names is not None and len(label_names) != path.num_classes:
        raise ValueError(f'task {name!r} has {path.num_classes} classes but {len(label_names)} label names were given')
    data = dict(data_config or info.get('data_config') or model.data_config)
    owned = _owned(model, name)
    config = {
        'format': FORMAT, 'format_version': FORMAT_VERSION, 'task': name,
        'num_classes': path.num_classes, 'label_names': list(label_names) if label_names is not None else None,
        'owns': owned, 'trainable_parameters': owned['mixtures'] + owned['patch'] + owned['head'],
        'backbone': {**model.backbone_info, 'fingerprint': model.fingerprint(), 'fingerprint_spec': FINGERPRINT},
        'layers_per_bank': [sum(s.num_layers for s in group) for group in model._per_bank(path)],
        'temperature': model.temperature,
        'data_config': {k: _plain(v) for k, v in data.items() if k in DATA_KEYS},
        'results': dict(results if results is not None else info.get('results') or {}),
    }
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to('cpu').contiguous() for k, v in path.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={'format': 'pt', 'task': name})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=1) + '\n', encoding='utf-8')
    model.task_info[name] = {k: config[k] for k in ('label_names', 'data_config', 'results')}
    return str(out)


# --- load -------------------------------------------------------------------------------------------
def _adapter_files(source: str, cache_dir: Optional[str]) -> Tuple[Path, Path, str]:
    """(config file, weight file, label for errors) of a folder or `hf-hub:ORG/NAME[@revision]`."""
    if source.startswith('hf-hub:'):
        repo = source[len('hf-hub:'):]
        files = [_hub_download(repo, n, cache_dir) for n in (CONFIG_NAME, WEIGHTS_NAME)]
        if None in files:
            from huggingface_hub import constants
            raise WeightsNotPublishedError(
                f'{repo}: no task adapter ({CONFIG_NAME} and {WEIGHTS_NAME}) at {constants.ENDPOINT}; publish one '
                f'with `{publish_task_command(repo.partition("@")[0])}`')
        return Path(files[0]), Path(files[1]), f'{source} ({Path(files[1]).parent})'
    folder = Path(source)
    if folder.is_file() and folder.name.endswith(PICKLED_SUFFIXES):
        raise PickledWeightsError(f'{source}: a pickle; task adapters are read from safetensors only (unpickling can '
                                  f'run code). Save the task with model.save_task(name, folder)')
    if not folder.is_dir():
        raise PretrainedWeightsError(f'{source}: not a task adapter folder ({CONFIG_NAME} + {WEIGHTS_NAME}) '
                                     f'nor hf-hub:ORG/NAME')
    if not (folder / WEIGHTS_NAME).is_file():
        pickled = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLED_SUFFIXES))
        if pickled:
            raise PickledWeightsError(f'{source}: holds the pickle {pickled[0]} but no {WEIGHTS_NAME}; task adapters '
                                      f'are read from safetensors only (unpickling can run code)')
        raise PretrainedWeightsError(f'{source}: no {WEIGHTS_NAME} in this folder')
    if not (folder / CONFIG_NAME).is_file():
        raise PretrainedWeightsError(f'{source}: no {CONFIG_NAME} in this folder')
    return folder / CONFIG_NAME, folder / WEIGHTS_NAME, source


def read_adapter(source: str, cache_dir: Optional[str] = None) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor], str]:
    """(config, tensors, label) of an adapter folder or Hub repository, checked: JSON, format, safetensors file."""
    config_file, weights_file, where = _adapter_files(str(source), cache_dir)
    try:
        config = json.loads(config_file.read_text(encoding='utf-8'))
    except ValueError as e:
        raise PretrainedWeightsError(f'{where}/{CONFIG_NAME}: not valid JSON ({e})') from e
    if not isinstance(config, dict) or config.get('format') != FORMAT:
        found = config.get('format') if isinstance(config, dict) else type(config).__name__
        raise PretrainedWeightsError(f'{where}/{CONFIG_NAME}: not a timm_isomix task adapter (format {found!r}, '
                                     f'expected {FORMAT!r})')
    missing = [k for k in ('task', 'num_classes', 'backbone', 'layers_per_bank') if k not in config]
    if missing:
        raise PretrainedWeightsError(f'{where}/{CONFIG_NAME}: lacks {missing}; not an adapter save_task wrote')
    if int(config.get('format_version', 0)) > FORMAT_VERSION:
        raise PretrainedWeightsError(f'{where}: adapter format version {config["format_version"]} is newer than this '
                                     f'timm_isomix reads ({FORMAT_VERSION}); upgrade timm_isomix')
    check_weights_file(str(weights_file))  # PretrainedWeightsError for a truncated or corrupted file
    return config, load_file(str(weights_file)), where


def _check_backbone(model, config: Dict[str, Any], where: str, allow_other_backbone: bool) -> None:
    theirs, mine = config.get('backbone') or {}, model.backbone_info
    if theirs.get('architecture') != mine['architecture']:
        raise PretrainedWeightsError(f'{where}: an adapter for backbone architecture {theirs.get("architecture")!r}, '
                                     f'this model\'s backbone is {mine["architecture"]!r}')
    if config.get('layers_per_bank') != list(model.bank_layers):
        raise PretrainedWeightsError(
            f'{where}: the adapter runs {config.get("layers_per_bank")} executed layers per bank, this backbone '
            f'{model.bank_layers}; build the backbone with model_args {theirs.get("model_args")}')
    if float(config.get('temperature', 1.0)) != model.temperature:
        raise PretrainedWeightsError(f'{where}: mixtures at temperature {config.get("temperature")}, this backbone\'s '
                                     f'at {model.temperature}')
    expected, found = theirs.get('fingerprint'), model.fingerprint()
    if expected != found and not allow_other_backbone:
        raise BackboneMismatchError(
            f'{where}: trained over a backbone with fingerprint {expected}, but this model\'s backbone has {found}: '
            f'other shared weights, so the task would compute something else. Load the backbone it names '
            f'({theirs.get("name")!r}), or pass allow_other_backbone=True for a backbone changed on purpose')


def load_task(model, source: str, name: Optional[str] = None, allow_other_backbone: bool = False,
              cache_dir: Optional[str] = None):
    """Add the adapter at `source` (a folder, or `hf-hub:ORG/NAME[@revision]`) to `model` as task `name`
    (default: the adapter's task name); return its TaskPath. Raises PretrainedWeightsError (module docstring)."""
    config, state, where = read_adapter(source, cache_dir)
    _check_backbone(model, config, where, allow_other_backbone)
    task = name or config.get('task')
    owns = config.get('owns') or {}
    path = model.add_task(task, int(config['num_classes']), patch=bool(owns.get('patch')))
    try:
        check_state_dict(state, path, f'{where}/{WEIGHTS_NAME}')
        path.load_state_dict(state)
    except BaseException:
        del model.tasks[task]
        raise
    model.task_info[task] = {'label_names': config.get('label_names'), 'data_config': config.get('data_config'),
                             'results': config.get('results') or {}}
    return path
