"""New tasks over a frozen backbone from the command line: `train.py --tasks FILE` with a `backbone`.

    backbone: isomix_iso_64_8_p4.cifar10      # a model name with pretrained weights, a train.py checkpoint,
    tasks:                                    # hf-hub:ORG/NAME or local-dir:PATH
      - {name: mnistm, data: mnistm, classes: 10, mode: mixture_patch}
      - {name: svhn, data: svhn, classes: 10, mode: linear}

Each task is added to one `MultiTaskIsoMix` over the backbone and trained alone in its mode (`ADAPTER_MODES`,
named as tasks/transfer.py's TRANSFER_MODES: what learns is the task's own mixture logits, patch and head; its
statistics are re-estimated on its data), one task after the other, with the run's optimizer settings. The
backbone's weights and buffers are not trained and stay bit-identical. Written to `<output>/<experiment>`: one
adapter folder per task (`<name>/adapter_config.json`, `<name>/adapter_model.safetensors`, models/task_adapter.py)
and `results.json` (per task: mode, top-1 on its validation split, trainable parameters, history).
"""
import json
import logging
from pathlib import Path
from typing import Any, Dict

import timm
import torch
from timm.utils import get_outdir

from ..models._hub import PretrainedWeightsError, torch_load_like_timm
from ..models.isometric import IsoMixNet
from ..models.multitask import MultiTaskIsoMix
from ..models.resnet import IsoMixResNet
from ..train.config import ConfigError
from ..train.datasets import prepare_dataset
from ..train.files import atomic_write_bytes
from .data import load_task_data
from .transfer import transfer

__all__ = ['ADAPTER_MODES', 'check_adapter_config', 'load_backbone', 'train_adapters']

_logger = logging.getLogger(__name__)

# The transfer modes that train only what a task owns over a frozen backbone.
ADAPTER_MODES = ('mixture', 'patch', 'mixture_patch', 'linear')
DEFAULT_MODE = 'mixture'


def check_adapter_config(config) -> None:
    """ValueError when a task config's `backbone` and tasks' `mode`s do not go together (read time, one line)."""
    modes = {t.name: t.mode for t in config.tasks if getattr(t, 'mode', None) is not None}
    if config.backbone is None:
        if modes:
            raise ValueError(f'tasks {sorted(modes)} name a mode, which trains a task over a frozen backbone: '
                             f'add "backbone:" (a model name with pretrained weights, a checkpoint, hf-hub: or local-dir:)')
        return
    bad = {n: m for n, m in modes.items() if m not in ADAPTER_MODES}
    if bad:
        raise ValueError(f'task modes {bad}: expected one of {ADAPTER_MODES}')
    controls = [k for k in ('share_from', 'mixture_init', 'router_lr') if getattr(config, k) is not None]
    controls += [k for k in ('hard_shared', 'patch', 'independent', 'share_head') if getattr(config, k)]
    controls += ['model_kwargs routing'] if (config.model_kwargs or {}).get('routing') is not None else []
    if controls:
        raise ValueError(f'{controls} are joint multi-task options; over a frozen backbone each task trains alone in '
                         f'its mode: remove them or remove "backbone"')


def load_backbone(spec: str, model_kwargs: Dict[str, Any]) -> torch.nn.Module:
    """The backbone `spec` names, with its weights and no classifier: `hf-hub:ORG/NAME`, `local-dir:PATH`, a train.py
    checkpoint file (its 'arch' and 'model_args'; weights as timm loads a checkpoint), or a model name with
    pretrained weights (e.g. `isomix_resnet50.a1_in1k`). Raises ConfigError naming the problem."""
    import timm_isomix  # noqa: F401  (registers the isomix architectures)
    kwargs = dict(model_kwargs, num_classes=0)
    try:
        if Path(spec).is_file():
            ckpt = torch_load_like_timm(spec)
            if not isinstance(ckpt, dict) or 'arch' not in ckpt:
                raise ConfigError(f'backbone {spec}: not a train.py checkpoint (no "arch"); give a checkpoint, a model '
                                  f'name with pretrained weights, hf-hub:ORG/NAME or local-dir:PATH')
            args = {k: v for k, v in (ckpt.get('model_args') or {}).items() if k != 'num_classes'}
            model = timm.create_model(ckpt['arch'], pretrained=True, pretrained_cfg_overlay=dict(file=spec),
                                      **{**args, **kwargs})
        else:
            model = timm.create_model(spec, pretrained=True, **kwargs)
    except (PretrainedWeightsError, RuntimeError, ValueError, OSError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f'backbone {spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}') from e
    if not isinstance(model, (IsoMixNet, IsoMixResNet)) or not model.mixtures():
        raise ConfigError(f'backbone {spec}: {type(model).__name__} is not an isomix model with mixtures '
                          f'(isomix_resnet*, isomix_iso_*)')
    return model


def _data(config, task, split: str):
    root = prepare_dataset(task.data, config.data_dir)
    limit = getattr(task, f'{split}_limit')
    limit = limit if limit is not None else getattr(config, f'{split}_limit')
    return load_task_data(root, split, task.classes, config.img_size, limit, config.seed, task.name)


def train_adapters(config) -> Dict[str, Any]:
    """Train each task of `config` (a tasks.train_tasks.MultiTaskConfig with `backbone`) over the frozen backbone
    and write its adapter (module docstring); returns the results written to results.json."""
    device = torch.device(config.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    backbone = load_backbone(config.backbone, config.model_kwargs)
    model = MultiTaskIsoMix(backbone, {}).to(device)
    model.backbone_info['name'] = config.backbone
    exp = config.experiment or f'adapters-{config.source}-{Path(config.backbone.split(":")[-1]).name}'
    out_dir = Path(get_outdir(config.output or './output/train', exp, inc=True))
    _logger.info(f'writing to {out_dir}')
    results: Dict[str, Any] = {'backbone': config.backbone, 'architecture': model.backbone_info['architecture'],
                               'fingerprint': model.fingerprint(), 'out_dir': str(out_dir), 'tasks': {}}
    data_config = {'input_size': (3, config.img_size, config.img_size), 'interpolation': 'bilinear',
                   'mean': (0.5,) * 3, 'std': (0.5,) * 3, 'crop_pct': 1.0}  # tasks/data.py's transform
    for t in config.tasks:
        mode = t.mode or DEFAULT_MODE
        torch.manual_seed(config.seed)
        res = transfer(model, t.name, t.num_classes, _data(config, t, 'train'), _data(config, t, 'val'), mode=mode,
                       device=device, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, opt=config.opt,
                       weight_decay=config.weight_decay, mixture_lr_mult=config.mixture_lr_mult,
                       warmup_epochs=config.warmup_epochs, seed=config.seed)
        folder = model.save_task(
            t.name, str(out_dir / t.name), label_names=t.classes if isinstance(t.classes, list) else None,
            data_config=data_config, results={'top1': res['top1'], 'mode': mode, 'epochs': config.epochs,
                                              'dataset': Path(str(t.data)).name})
        results['tasks'][t.name] = {'mode': mode, 'top1': res['top1'], 'trainable': res['trainable'],
                                    'adapter': folder, 'history': res['history']}
        print(json.dumps({'task': t.name, 'mode': mode, 'top1': res['top1'], 'trainable': res['trainable'],
                          'adapter': folder}), flush=True)
    atomic_write_bytes(json.dumps(results, indent=1).encode(), str(out_dir / 'results.json'))
    return results
