"""The whole run of train.py, built on timm's public API (timm.data, timm.loss, timm.optim,
timm.scheduler, timm.utils), aware of isomix mixtures.

Data, model and loading follow timm's train.py: images are read in the mode the resolved data config asks
for (`--input-img-mode`, else 'RGB' for 3 channels and 'L' otherwise), `--input-size C H W` sets the
model's input channels, `--torchcompile` compiles before DDP (checkpoints keep the plain model's keys).
What differs from a plain timm run:
- the mixture logits form their own optimizer group: no weight decay, lr * `--mixture-lr-mult`;
- each epoch logs the mixtures (per layer: entropy of alpha, leading template) and writes `mixtures.png`;
- checkpoints rebuild their model and are written atomically (see checkpoint.py);
- DDP passes `device_ids` only on CUDA, so torchrun also trains on CPU (gloo);
- each epoch's randomness is seeded from (seed, epoch), so a run resumed from an epoch's checkpoint
  takes the same path as one that was never stopped (with `-j 0`; worker processes keep their own state).
"""
import argparse
import importlib
import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import yaml

import timm
from timm.data import ImageDataset, Mixup, create_dataset, create_loader, resolve_data_config
from timm.layers import convert_sync_batchnorm
from timm.loss import create_classification_loss
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, NativeScaler, distribute_bn, random_seed, trim_summary, update_summary

from .. import models  # noqa: F401  (registers the isomix models)
from .checkpoint import (
    CheckpointKeeper, atomic_write_bytes, check_against_checkpoint, load_checkpoint_file, make_output_dir,
    model_args_of, plain)
from .config import ConfigError
from .distributed import finish_distributed, is_primary, setup_distributed
from .loop import evaluate, train_one_epoch
from .mixture_log import log_mixtures, write_mixture_heatmap
from .optim import create_optimizer, model_lr, resolve_lr

__all__ = ['train', 'input_img_mode', 'input_chans']

_logger = logging.getLogger('train')


def input_img_mode(args: argparse.Namespace, data_config: Dict[str, Any]) -> str:
    """The PIL mode images are read in, as timm's train.py and validate.py choose it: --input-img-mode, else
    'RGB' when the resolved data config has 3 channels and 'L' otherwise (a grayscale folder for an RGB model
    is read as RGB)."""
    if args.input_img_mode:
        return args.input_img_mode
    return 'RGB' if data_config['input_size'][0] == 3 else 'L'


def input_chans(args: argparse.Namespace) -> Optional[int]:
    """The model's input channels as timm's scripts set them: --in-chans, else --input-size's first value
    (None: the model's default or the checkpoint's)."""
    if args.in_chans is not None:
        return args.in_chans
    return args.input_size[0] if args.input_size else None


def _check_data_dir(args: argparse.Namespace) -> None:
    folder_like = not args.dataset or args.dataset.split('/', 1)[0] in ('folder', 'imagefolder')
    if folder_like:
        if not args.data_dir:
            raise ConfigError('--data-dir is required (a folder holding train/ and val/ class folders)')
        if not os.path.isdir(args.data_dir):
            raise ConfigError(f'data directory not found: {args.data_dir}')


def _num_classes_of(dataset) -> Optional[int]:
    reader = getattr(dataset, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None)
    return len(class_to_idx) if class_to_idx else None


def _read_checkpoints(args: argparse.Namespace) -> Tuple[Optional[Dict[str, Any]], Dict[str, Any], Optional[str]]:
    """The --resume checkpoint (if any), the model kwargs stored in it or in --initial-checkpoint, its folder."""
    resume_ckpt, model_args, resume_dir = None, {}, None
    if args.resume:
        resume_ckpt = load_checkpoint_file(args.resume)
        model_args = check_against_checkpoint(resume_ckpt, args, args.resume, '--resume')
        resume_dir = os.path.dirname(os.path.abspath(args.resume))
    elif args.initial_checkpoint:
        init = load_checkpoint_file(args.initial_checkpoint)
        model_args = check_against_checkpoint(init, args, args.initial_checkpoint, '--initial-checkpoint')
    args.model = args.model or 'resnet50'
    if not timm.is_model(args.model):
        raise ConfigError(f'unknown model {args.model!r} (see timm.list_models("isomix_*"))')
    if args.grad_accum_steps < 1:
        raise ConfigError(f'--grad-accum-steps must be at least 1, got {args.grad_accum_steps}')
    return resume_ckpt, model_args, resume_dir


def _create_dataset(args: argparse.Namespace, training: bool, img_mode: Optional[str]):
    split = args.train_split if training else args.val_split
    num_samples = args.train_num_samples if training else args.val_num_samples
    try:
        dataset = create_dataset(
            args.dataset, root=args.data_dir, split=split, is_training=training, num_samples=num_samples,
            class_map=args.class_map, batch_size=args.batch_size, seed=args.seed, input_img_mode=img_mode,
            input_key=args.input_key, target_key=args.target_key)
    except (FileNotFoundError, RuntimeError, AssertionError) as e:
        raise ConfigError(f'cannot read dataset {args.dataset or "(folder)"} at {args.data_dir}: {e}') from None
    if training and len(dataset) == 0:
        raise ConfigError(f'no training images found in {args.data_dir} (split {args.train_split!r})')
    return dataset


def _count_classes(args: argparse.Namespace, model_args: Dict[str, Any]):
    """With neither --num-classes nor a checkpoint's class count, the training folder's classes set the model's
    (timm's script keeps the model default). Returns the training dataset read for it, or None."""
    if 'num_classes' in model_args or args.num_classes is not None:
        return None
    dataset_train = _create_dataset(args, True, img_mode=None)  # the mode is set once the model is known
    args.num_classes = _num_classes_of(dataset_train)
    if args.num_classes is not None:
        _logger.info(f'--num-classes not given: {args.num_classes} classes found in the training split')
    return dataset_train


def _create_datasets(args: argparse.Namespace, img_mode: str, dataset_train=None):
    """Train and eval datasets reading images in `img_mode`; `dataset_train`: the one _count_classes read."""
    if isinstance(dataset_train, ImageDataset):
        dataset_train.input_img_mode = img_mode  # an ImageDataset converts each image as it reads it
    else:
        dataset_train = _create_dataset(args, True, img_mode)
    dataset_eval = _create_dataset(args, False, img_mode) if args.val_split else None
    return dataset_train, dataset_eval


def _create_model(args: argparse.Namespace, model_args: Dict[str, Any]) -> nn.Module:
    """The model from its name, the checkpoint's kwargs (schedule included), --model-kwargs and timm's flags."""
    create_kwargs = dict(model_args)
    create_kwargs.update(args.model_kwargs or {})
    for key, value in (('num_classes', args.num_classes), ('in_chans', input_chans(args)), ('global_pool', args.gp),
                       ('drop_rate', args.drop), ('drop_path_rate', args.drop_path),
                       ('drop_block_rate', args.drop_block), ('bn_momentum', args.bn_momentum), ('bn_eps', args.bn_eps)):
        if value is not None and not (key == 'drop_rate' and value == 0.):
            create_kwargs[key] = value
    try:
        # --pretrained-path: timm's overlay, whose num_classes=-1 always adapts the head
        overlay = dict(file=args.pretrained_path, num_classes=-1) if args.pretrained_path else None
        model = timm.create_model(args.model, pretrained=args.pretrained, pretrained_cfg_overlay=overlay,
                                  checkpoint_path=args.initial_checkpoint or None, **create_kwargs)
    except (TypeError, ValueError) as e:  # an argument the model does not take, or a value it cannot use
        if isinstance(e, ConfigError):
            raise
        given = f' --model-kwargs {args.model_kwargs}' if args.model_kwargs else ' these arguments'
        raise ConfigError(f'model {args.model!r} cannot be built with{given}: {str(e).splitlines()[0]}') from None
    if args.head_init_scale is not None or args.head_init_bias is not None:
        with torch.no_grad():
            head = model.get_classifier()
            if args.head_init_scale is not None:
                head.weight.mul_(args.head_init_scale)
                head.bias.mul_(args.head_init_scale)
            if args.head_init_bias is not None:
                nn.init.constant_(head.bias, args.head_init_bias)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if is_primary(args):
        _logger.info(f'Model {args.model} created, params: {sum(p.numel() for p in model.parameters()):,}')
    return model


def _restore(ckpt: Optional[Dict[str, Any]], args: argparse.Namespace, model: nn.Module, optimizer,
             loss_scaler) -> int:
    """Load a resumed run's model, optimizer and scaler state; return the first epoch to train."""
    if ckpt is None:
        return 0
    model.load_state_dict(ckpt['state_dict'])
    if not args.no_resume_opt:
        if 'optimizer' in ckpt:
            optimizer.load_state_dict(ckpt['optimizer'])
        if loss_scaler is not None and 'amp_scaler' in ckpt:
            loss_scaler.load_state_dict(ckpt['amp_scaler'])
    _logger.info(f'Resumed {args.resume} (epoch {int(ckpt.get("epoch", -1))} done)')
    return int(ckpt.get('epoch', -1)) + 1


def _create_loaders(args, data_config, dataset_train, dataset_eval, device, num_classes):
    """Train and eval loaders with timm's augmentation flags, and the mixup/cutmix function (or None)."""
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
    use_prefetcher = not args.no_prefetcher and device.type == 'cuda'  # the prefetcher's side stream is CUDA's
    train_interp = args.train_interpolation
    if args.no_aug or not train_interp:
        train_interp = data_config['interpolation']
    loader_train = create_loader(
        dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, re_split=args.resplit,
        train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa, num_aug_repeats=int(args.aug_repeats),
        interpolation=train_interp, mean=data_config['mean'], std=data_config['std'], num_workers=args.workers,
        distributed=args.distributed, pin_memory=args.pin_mem, device=device, use_prefetcher=use_prefetcher,
        worker_seeding=args.worker_seeding)
    if len(loader_train) == 0:
        raise ConfigError(f'{len(dataset_train)} training images give no full batch of {args.batch_size} '
                          f'per process: lower -b/--batch-size')
    loader_eval = None
    if dataset_eval is not None:
        loader_eval = create_loader(
            dataset_eval, input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
            is_training=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
            std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
            crop_pct=data_config['crop_pct'], pin_memory=args.pin_mem, device=device, use_prefetcher=use_prefetcher)
    return loader_train, loader_eval, mixup_fn


def _create_scheduler(args, optimizer, updates_per_epoch: int, start_epoch: int, resume_ckpt):
    """timm's lr scheduler, restored and stepped to `start_epoch` for a resumed run; (scheduler, epochs, start)."""
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
        updates_per_epoch=updates_per_epoch)
    if args.start_epoch is not None:  # as timm: an explicit start epoch overrides the resumed one
        start_epoch = args.start_epoch
    if lr_scheduler is not None:
        if resume_ckpt is not None and not args.no_resume_opt and resume_ckpt.get('scheduler'):
            lr_scheduler.load_state_dict(resume_ckpt['scheduler'])
        if start_epoch > 0:  # creating the scheduler reset the groups' lr to the base values: set this epoch's
            if args.sched_on_updates:
                lr_scheduler.step_update(start_epoch * updates_per_epoch)
            else:
                lr_scheduler.step(start_epoch)
    return lr_scheduler, num_epochs, start_epoch


class _Run:
    """Everything one training run holds between epochs."""

    def __init__(self, args: argparse.Namespace, args_text: Optional[str]):
        self.args = args
        for module in getattr(args, 'device_modules', None) or ():  # device backends (e.g. torch_npu), as timm
            importlib.import_module(module)
        self.device = device = setup_distributed(args)
        if args.distributed:
            _logger.info(f'Distributed: process {args.rank} of {args.world_size}, device {device}')
        if not is_primary(args):
            logging.getLogger().setLevel(logging.WARNING)
        random_seed(args.seed, args.rank)
        _check_data_dir(args)
        resume_ckpt, model_args, resume_dir = _read_checkpoints(args)
        dataset_train = _count_classes(args, model_args)
        model = _create_model(args, model_args)
        self.num_classes = model.num_classes
        self.in_chans = getattr(model, 'in_chans', None) or input_chans(args) or 3
        self.data_config = resolve_data_config(vars(args), model=model, verbose=is_primary(args))
        dataset_train, dataset_eval = _create_datasets(args, input_img_mode(args, self.data_config), dataset_train)
        self.output_dir = make_output_dir(args, device, resume_dir)
        self.module = model  # the bare model (no DDP or compile wrapper): checkpoints, mixture logs
        start_epoch = self._setup_training(model, resume_ckpt)
        self.loader_train, self.loader_eval, self.mixup_fn = _create_loaders(
            args, self.data_config, dataset_train, dataset_eval, device, self.num_classes)
        self.train_loss_fn = create_classification_loss(
            loss_type='bce' if args.bce_loss else None, smoothing=args.smoothing, soft_targets=self.mixup_fn is not None,
            bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum, pos_weight=args.bce_pos_weight).to(device)
        self.eval_loss_fn = nn.CrossEntropyLoss().to(device)
        self.updates_per_epoch = (len(self.loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
        self.lr_scheduler, self.num_epochs, self.start_epoch = _create_scheduler(
            args, self.optimizer, self.updates_per_epoch, start_epoch, resume_ckpt)
        self.summary = os.path.join(self.output_dir, 'summary.csv')
        self.keeper = None
        if is_primary(args):
            _logger.info(f'Scheduled epochs: {self.num_epochs} ({self.updates_per_epoch} updates per epoch); '
                         f'training {self.start_epoch}..{self.num_epochs - 1} into {self.output_dir}')
            self.keeper = CheckpointKeeper(self.output_dir, args.checkpoint_hist, decreasing=args.eval_metric == 'loss')
            if resume_ckpt is not None:
                self.keeper.drop_after(self.start_epoch - 1)
            trim_summary(self.summary, self.start_epoch)
            atomic_write_bytes((args_text or yaml.safe_dump(vars(args))).encode(),
                               os.path.join(self.output_dir, 'args.yaml'))
            log_mixtures(self.module, self.start_epoch - 1)
        self.results = dict(resume_ckpt.get('results') or {}) if resume_ckpt is not None else {}
        self.metric = resume_ckpt.get('metric') if resume_ckpt is not None else None

    def _setup_training(self, model: nn.Module, resume_ckpt: Optional[Dict[str, Any]]) -> int:
        """Device, sync BN, optimizer, AMP scaler, EMA, then compile and DDP as timm orders them; sets
        self.model (what trains) and self.ema_eval (what evaluates the EMA). Returns the first epoch."""
        args, device = self.args, self.device
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        if args.distributed and args.sync_bn:
            args.dist_bn = ''  # synchronized statistics need no averaging after the epoch
            model = self.module = convert_sync_batchnorm(model)  # timm's: keeps BatchNormAct2d's activation
        resolve_lr(args)
        self.optimizer = create_optimizer(model, args)
        self.loss_scaler = NativeScaler(device=device.type) if args.amp and args.amp_dtype == 'float16' else None
        start_epoch = _restore(resume_ckpt, args, model, self.optimizer, self.loss_scaler)
        self.model_ema = self.ema_eval = None
        if args.model_ema:
            self.model_ema = self.ema_eval = ModelEmaV3(
                model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                device='cpu' if args.model_ema_force_cpu else None)
            if resume_ckpt is not None and resume_ckpt.get('state_dict_ema') is not None:
                self.model_ema.module.load_state_dict(resume_ckpt['state_dict_ema'])
        if args.torchcompile:  # before DDP, as timm: DDP stays outside the graph; the EMA is compiled too
            compile_kwargs = dict(backend=args.torchcompile, mode=args.torchcompile_mode)
            model = torch.compile(model, **compile_kwargs)
            if self.model_ema is not None:
                self.ema_eval = torch.compile(self.model_ema.module, **compile_kwargs)
        if args.distributed:
            # device_ids only on CUDA: DDP rejects device_ids for CPU modules (timm's script passes them).
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)
        self.model = model
        return start_epoch

    def epoch(self, epoch: int) -> Tuple[Dict[str, float], Optional[Dict[str, float]]]:
        """Train one epoch, then evaluate (the EMA model too); return (train, eval) metrics."""
        args, device = self.args, self.device
        # Each epoch's randomness (data order, augmentation, mixup, drop-path) depends only on (seed, epoch, rank).
        random_seed(args.seed * 1000 + epoch, args.rank)
        if hasattr(self.loader_train, 'sampler') and hasattr(self.loader_train.sampler, 'set_epoch'):
            self.loader_train.sampler.set_epoch(epoch)
        train_metrics = train_one_epoch(
            epoch, self.model, self.loader_train, self.optimizer, self.train_loss_fn, args, device,
            lr_scheduler=self.lr_scheduler, model_ema=self.model_ema, mixup_fn=self.mixup_fn,
            loss_scaler=self.loss_scaler, num_updates_start=epoch * self.updates_per_epoch)
        distribute = args.distributed and args.dist_bn in ('broadcast', 'reduce')
        if distribute:
            distribute_bn(self.model, args.world_size, args.dist_bn == 'reduce')
        eval_metrics = None
        if self.loader_eval is not None:
            eval_metrics = evaluate(self.model, self.loader_eval, self.eval_loss_fn, args, device)
            if self.model_ema is not None and not args.model_ema_force_cpu:
                if distribute:
                    distribute_bn(self.model_ema, args.world_size, args.dist_bn == 'reduce')
                eval_metrics = evaluate(self.ema_eval, self.loader_eval, self.eval_loss_fn, args, device,
                                        log_suffix=' (EMA)')
            self.metric = eval_metrics[args.eval_metric]
            self.results = {k: eval_metrics[k] for k in ('top1', 'top5', 'loss')}
        if self.lr_scheduler is not None:
            self.lr_scheduler.step(epoch + 1, self.metric)
        return train_metrics, eval_metrics

    def save(self, epoch: int, train_metrics, eval_metrics) -> Optional[str]:
        """Rank 0: summary row, mixture log and heatmap, checkpoints. Returns the heatmap's path."""
        args, model = self.args, self.module
        update_summary(epoch, {'loss': train_metrics['loss']}, eval_metrics or {}, filename=self.summary,
                       lr=model_lr(self.optimizer), write_header=not os.path.exists(self.summary))
        log_mixtures(model, epoch)
        heatmap = write_mixture_heatmap(model, self.output_dir, epoch)
        state = {
            'epoch': epoch,
            'arch': args.model,
            'model_args': model_args_of(model, self.num_classes, self.in_chans, args.model_kwargs),
            'state_dict': model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            'args': plain(vars(args)),
            'metric': self.metric if eval_metrics is not None else None,
            'data_config': plain(self.data_config),
            'results': self.results,
            'version': 2,
        }
        if self.model_ema is not None:
            state['state_dict_ema'] = self.model_ema.module.state_dict()
        if self.loss_scaler is not None:
            state['amp_scaler'] = self.loss_scaler.state_dict()
        self.keeper.save(state, epoch, state['metric'])
        _logger.info(f'Saved checkpoint of epoch {epoch} to {self.keeper.path("last.pth.tar")}')
        return heatmap


def train(args: argparse.Namespace, args_text: Optional[str] = None) -> Dict[str, Any]:
    """Run a whole training from parsed train.py args; return the final metrics and output paths.

    Raises ConfigError for problems the user must fix (before anything is written).
    """
    run = _Run(args, args_text)
    heatmap = None
    for epoch in range(run.start_epoch, run.num_epochs):
        train_metrics, eval_metrics = run.epoch(epoch)
        if is_primary(args):
            heatmap = run.save(epoch, train_metrics, eval_metrics)
        if args.distributed:
            torch.distributed.barrier()
    if is_primary(args) and heatmap is None:
        heatmap = write_mixture_heatmap(run.module, run.output_dir, run.num_epochs - 1)
    finish_distributed(args)
    return {'output_dir': run.output_dir, 'results': run.results, 'metric': run.metric, 'heatmap': heatmap,
            'epochs': run.num_epochs}
