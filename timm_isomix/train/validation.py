"""validate.py's logic: timm's validate.py flags, top-1/top-5 of one model or many, JSON or CSV results.

A train.py checkpoint rebuilds its own model: 'arch' and 'model_args' (schedule included) go to
timm.create_model, and its 'data_config' is the evaluation preprocessing unless flags override it.
As in timm's validate.py: without --checkpoint the pretrained weights are used (--pretrained is implied);
a model pattern or `all` validates the models with pretrained weights (tags); a file of model names, one
per line, validates those; images are read as --input-img-mode says, else 'RGB' for 3 channels and 'L'
otherwise; --input-size C H W sets the model's input channels.
"""
import argparse
import csv
import glob
import json
import logging
import os
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import timm
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.models import load_checkpoint
from timm.utils import natural_key

from .. import models  # noqa: F401  (registers the isomix models)
from ..models._hub import PretrainedWeightsError
from .checkpoint import load_checkpoint_file
from .config import ConfigError, KwargsAction, OneLineArgumentParser
from .loop import evaluate
from .run import input_chans, input_img_mode

__all__ = ['build_validate_parser', 'validate', 'validate_many', 'write_results']

_logger = logging.getLogger('validate')

# `all` skips these, as timm's validate.py does (weights not for ImageNet-1k's classes)
NON_IN1K_FILTERS = ['*_in21k', '*_in22k', '*in12k', '*_dino', '*fcmae', '*seer']


def build_validate_parser() -> argparse.ArgumentParser:
    """validate.py's parser: the flags of timm's validate.py that this script supports."""
    p = OneLineArgumentParser(description='Validate an isomix (or any timm) model on an image folder / timm dataset',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', metavar='DIR', help='path to dataset (deprecated: use --data-dir)')
    p.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    p.add_argument('--dataset', metavar='NAME', default='', help='dataset type + name ("<type>/<name>"), "" = folder')
    p.add_argument('--split', metavar='NAME', default='validation', help='dataset split')
    p.add_argument('--num-samples', default=None, type=int, metavar='N')
    p.add_argument('--class-map', default='', type=str, metavar='FILENAME')
    p.add_argument('--input-img-mode', default=None, type=str)
    p.add_argument('--input-key', default=None, type=str)
    p.add_argument('--target-key', default=None, type=str)
    p.add_argument('--model', '-m', metavar='NAME', default=None,
                   help='model name, a pattern ("isomix_*", "all": models with pretrained weights) or a file of '
                        'names to validate many; default: the checkpoint\'s')
    p.add_argument('--pretrained', dest='pretrained', action='store_true',
                   help='use pretrained weights (implied without --checkpoint)')
    p.add_argument('-j', '--workers', default=4, type=int, metavar='N')
    p.add_argument('-b', '--batch-size', default=256, type=int, metavar='N')
    p.add_argument('--img-size', default=None, type=int, metavar='N')
    p.add_argument('--in-chans', type=int, default=None, metavar='N')
    p.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N')
    p.add_argument('--use-train-size', action='store_true', default=False)
    p.add_argument('--crop-pct', default=None, type=float, metavar='N')
    p.add_argument('--crop-mode', default=None, type=str, metavar='N')
    p.add_argument('--crop-border-pixels', type=int, default=None)
    p.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
    p.add_argument('--std', type=float, nargs='+', default=None, metavar='STD')
    p.add_argument('--interpolation', default='', type=str, metavar='NAME')
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--gp', default=None, type=str, metavar='POOL')
    p.add_argument('--log-freq', default=10, type=int, metavar='N')
    p.add_argument('--checkpoint', default='', type=str, metavar='PATH',
                   help='checkpoint file, or a folder: validate each *.pth.tar / *.pth in it')
    p.add_argument('--use-ema', dest='use_ema', action='store_true', help='use the checkpoint\'s EMA weights')
    p.add_argument('--no-prefetcher', action='store_true', default=False)
    p.add_argument('--pin-mem', action='store_true', default=False)
    p.add_argument('--channels-last', action='store_true', default=False)
    p.add_argument('--device', default=None, type=str, help='default: cuda when available, else cpu')
    p.add_argument('--amp', action='store_true', default=False)
    p.add_argument('--amp-dtype', default='float16', type=str, choices=['float16', 'bfloat16'])
    p.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor')
    p.add_argument('--results-file', default='', type=str, metavar='FILENAME')
    p.add_argument('--results-format', default='csv', type=str, choices=['csv', 'json'],
                   help='format of --results-file (a .json file name implies json)')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=KwargsAction)
    return p


def _build(args: argparse.Namespace, model_name: str, checkpoint: str, device: torch.device):
    """The model for one validation, with the preprocessing config to evaluate it with."""
    ckpt_cfg: Dict[str, Any] = {}
    create_kwargs: Dict[str, Any] = {}
    ckpt = None
    if checkpoint:
        ckpt = load_checkpoint_file(checkpoint)
        arch = ckpt.get('arch')
        if arch and model_name and arch != model_name:
            raise ConfigError(f'--checkpoint {checkpoint} holds a {arch!r} model, but --model is {model_name!r}')
        model_name = model_name or arch
        create_kwargs.update(ckpt.get('model_args') or {})
        classes = create_kwargs.get('num_classes')
        if args.num_classes is not None and classes is not None and args.num_classes != classes:
            raise ConfigError(f'--num-classes {args.num_classes} contradicts --checkpoint {checkpoint}, '
                              f'which has {classes} classes')
        ckpt_cfg = dict(ckpt.get('data_config') or {})
    if not model_name:
        raise ConfigError('--model is required (or a --checkpoint written by train.py, which names its model)')
    if not timm.is_model(model_name):
        raise ConfigError(f'unknown model {model_name!r} (see timm.list_models("isomix_*"))')
    create_kwargs.update(args.model_kwargs or {})
    for key, value in (('num_classes', args.num_classes), ('in_chans', input_chans(args)), ('global_pool', args.gp)):
        if value is not None:
            create_kwargs[key] = value
    # as timm's validate.py: a model without a checkpoint is validated with its pretrained weights
    pretrained = args.pretrained or not checkpoint
    try:
        model = timm.create_model(model_name, pretrained=pretrained, **create_kwargs)
    except (PretrainedWeightsError, OSError) as e:  # OSError: the Hub's download and offline errors
        if not pretrained:
            raise
        raise ConfigError(f'{model_name}: cannot load its pretrained weights ({type(e).__name__}: '
                          f'{str(e).splitlines()[0]}); give --checkpoint to validate weights of your own') from None
    except (TypeError, ValueError) as e:  # the arguments: --model-kwargs, or a checkpoint's model_args
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f'model {model_name!r} cannot be built with {create_kwargs}: {str(e).splitlines()[0]}') \
            from None
    if ckpt is not None and 'state_dict' in ckpt:
        key = 'state_dict_ema' if args.use_ema else 'state_dict'
        if ckpt.get(key) is None:
            raise ConfigError(f'--checkpoint {checkpoint} has no {key!r} (trained without --model-ema?)')
        model.load_state_dict(ckpt[key])
    elif checkpoint:  # a plain state dict or another trainer's checkpoint: timm's loader knows those
        load_checkpoint(model, checkpoint, use_ema=args.use_ema)
    if ckpt_cfg:
        ckpt_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt_cfg.items()}
        data_config = resolve_data_config(vars(args), pretrained_cfg=ckpt_cfg, use_test_size=not args.use_train_size)
    else:
        data_config = resolve_data_config(vars(args), model=model, use_test_size=not args.use_train_size)
    return model_name, model.to(device).eval(), data_config


def validate(args: argparse.Namespace, model_name: Optional[str] = None, checkpoint: Optional[str] = None
             ) -> Dict[str, Any]:
    """Validate one model; return timm's result row (top1, top1_err, top5, top5_err, param_count, ...)."""
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    args.data_dir = args.data_dir or args.data
    model_name = args.model if model_name is None else model_name
    checkpoint = args.checkpoint if checkpoint is None else checkpoint
    if not args.dataset or args.dataset.split('/', 1)[0] in ('folder', 'imagefolder'):
        if not args.data_dir:
            raise ConfigError('--data-dir is required (a folder holding the --split class folders)')
        if not os.path.isdir(args.data_dir):
            raise ConfigError(f'data directory not found: {args.data_dir}')
    model_name, model, data_config = _build(args, model_name, checkpoint, device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)
    try:
        dataset = create_dataset(args.dataset, root=args.data_dir, split=args.split, class_map=args.class_map,
                                 num_samples=args.num_samples, input_img_mode=input_img_mode(args, data_config),
                                 input_key=args.input_key, target_key=args.target_key)
    except (FileNotFoundError, RuntimeError, AssertionError) as e:
        raise ConfigError(f'cannot read split {args.split!r} of {args.data_dir}: {e}') from None
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'),
        crop_border_pixels=args.crop_border_pixels, pin_memory=args.pin_mem, device=device,
        use_prefetcher=not args.no_prefetcher and device.type == 'cuda')
    eval_args = argparse.Namespace(distributed=False, channels_last=args.channels_last, amp=args.amp,
                                   amp_dtype=args.amp_dtype, rank=0, world_size=1)
    start = time.time()
    metrics = evaluate(model, loader, nn.CrossEntropyLoss().to(device), eval_args, device, logger=_logger)
    return OrderedDict(
        model=model_name, checkpoint=checkpoint or '',
        top1=round(metrics['top1'], 4), top1_err=round(100 - metrics['top1'], 4),
        top5=round(metrics['top5'], 4), top5_err=round(100 - metrics['top5'], 4), loss=round(metrics['loss'], 6),
        param_count=round(sum(p.numel() for p in model.parameters()) / 1e6, 4),
        img_size=data_config['input_size'][-1], crop_pct=data_config['crop_pct'],
        interpolation=data_config['interpolation'], samples=len(dataset),
        seconds=round(time.time() - start, 2))


def _targets(args: argparse.Namespace) -> List[Tuple[Optional[str], str]]:
    """(model, checkpoint) pairs: one, or many for a model pattern or a checkpoint folder."""
    if args.checkpoint and os.path.isdir(args.checkpoint):
        files = glob.glob(os.path.join(args.checkpoint, '*.pth.tar')) + glob.glob(os.path.join(args.checkpoint, '*.pth'))
        if not files:
            raise ConfigError(f'no *.pth.tar or *.pth checkpoints in folder {args.checkpoint}')
        return [(args.model, c) for c in sorted(files, key=natural_key)]
    if args.model and not timm.is_model(args.model) and os.path.isfile(args.model):
        with open(args.model) as f:  # a file of model names, one per line (timm's validate.py)
            return [(line.strip(), args.checkpoint) for line in f if line.strip()]
    if args.model and (args.model == 'all' or any(c in args.model for c in '*?[')):
        if args.checkpoint:
            raise ConfigError('a model pattern validates many models: give no --checkpoint (or a checkpoint folder)')
        # as timm: the models with pretrained weights (tags), ImageNet-1k ones for `all`
        names = timm.list_models(pretrained=True, exclude_filters=NON_IN1K_FILTERS) if args.model == 'all' else \
            timm.list_models(args.model, pretrained=True)
        if not names:
            raise ConfigError(f'no models with pretrained weights match {args.model!r}')
        return [(n, '') for n in names]
    return [(args.model, args.checkpoint)]


def validate_many(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Validate every target of `args` (see _targets); errors of one model in a bulk run are recorded."""
    targets = _targets(args)
    results = []
    for model_name, checkpoint in targets:
        if len(targets) == 1:
            results.append(validate(args, model_name, checkpoint))
            continue
        try:
            results.append(validate(args, model_name, checkpoint))
        except Exception as e:  # a bulk run goes on; the row says what failed
            _logger.error(f'{model_name} {checkpoint}: {type(e).__name__}: {e}')
            results.append(OrderedDict(model=model_name, checkpoint=checkpoint, error=f'{type(e).__name__}: {e}'))
    return results


def write_results(results: Sequence[Dict[str, Any]], path: str, fmt: str = 'csv') -> None:
    """Write result rows as JSON (a list) or CSV (the union of the rows' keys as columns)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if fmt == 'json' or path.endswith('.json'):
        with open(path, 'w') as f:
            json.dump(list(results), f, indent=2)
        return
    columns: List[str] = []
    for row in results:
        columns += [k for k in row if k not in columns]
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(results)
