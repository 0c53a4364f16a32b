"""The training loop of train.py, built on timm's public API (timm.data, timm.loss, timm.optim,
timm.scheduler, timm.utils), aware of isomix schedules.

What differs from a plain timm run:
- the mixture logits form their own optimizer group: no weight decay, lr * `--mixture-lr-mult`;
- each epoch logs the schedule (per layer: entropy of alpha, argmax order) and writes `mixtures.png`;
- checkpoints are self-describing ('arch' + 'model_args' rebuild the model with timm.create_model) and
  written atomically (temporary file in the same folder, fsync, os.replace), so a kill never leaves a
  half-written checkpoint in place of a good one;
- DDP passes `device_ids` only on CUDA, so torchrun also trains on CPU (gloo);
- each epoch's randomness is seeded from (seed, epoch), so a run resumed from an epoch's checkpoint
  takes the same path as one that was never stopped (with `-j 0`; worker processes keep their own state).

Public helpers (reused by timm_isomix.multitask): `setup_distributed`, `mixture_param_groups`,
`create_optimizer`, `atomic_save`, `CheckpointKeeper`, `schedule_report`, `log_schedule`,
`write_mixture_heatmap`, `model_args_of`, `make_output_dir`.
"""
import argparse
import contextlib
import glob
import io
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import yaml

import timm
from timm.data import Mixup, create_dataset, create_loader, resolve_data_config
from timm.loss import create_classification_loss
from timm.models import model_parameters, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import (
    AverageMeter, ModelEmaV3, NativeScaler, accuracy, dispatch_clip_grad, distribute_bn,
    init_distributed_device, random_seed, reduce_tensor, trim_summary, update_summary)

import timm_isomix  # noqa: F401  (registers the isomix models)
from .config import ConfigError
from .plot import plot_mixtures

__all__ = [
    'ConfigError', 'setup_distributed', 'mixture_param_groups', 'create_optimizer', 'atomic_save',
    'CheckpointKeeper', 'schedule_report', 'log_schedule', 'write_mixture_heatmap', 'mixture_alphas',
    'model_args_of', 'make_output_dir', 'load_checkpoint_file', 'train_one_epoch', 'evaluate', 'train',
]

_logger = logging.getLogger('train')

MIXTURE_SUFFIX = 'mixture.logits'


# --- distributed ---------------------------------------------------------------------------------
def setup_distributed(args: argparse.Namespace) -> torch.device:
    """Pick the device and, under torchrun, join the process group (NCCL on CUDA, gloo otherwise).

    Sets args.device, args.distributed, args.world_size, args.rank, args.local_rank.
    """
    if not args.device:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError(f'--device {args.device}: CUDA is not available on this machine (use --device cpu)')
    return init_distributed_device(args)


def is_primary(args: argparse.Namespace) -> bool:
    return getattr(args, 'rank', 0) == 0


def _all_agree(ok: bool, args: argparse.Namespace, device: torch.device) -> bool:
    """True when `ok` holds on every rank (so all ranks fail together instead of hanging)."""
    if not getattr(args, 'distributed', False):
        return ok
    flag = torch.tensor([1 if ok else 0], device=device if device.type == 'cuda' else 'cpu')
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


# --- optimizer --------------------------------------------------------------------------------------
def mixture_param_groups(
        model: nn.Module,
        weight_decay: float,
        lr: float,
        mixture_lr_mult: float = 1.0,
        layer_decay: Optional[float] = None,
) -> List[Dict[str, Any]]:
    """timm's parameter groups (weight decay / layer decay as timm builds them) with the mixture logits
    moved to a group of their own: `weight_decay=0`, `lr = lr * mixture_lr_mult`.

    The group carries an explicit 'lr', so timm's schedulers (which scale each group's initial lr)
    keep the ratio throughout the schedule.
    """
    no_wd = set(getattr(model, 'no_weight_decay', lambda: set())())
    if layer_decay is not None:
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay,
                                          no_weight_decay_list=no_wd)
    else:
        groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_wd)
    mixture = [p for n, p in model.named_parameters() if n.endswith(MIXTURE_SUFFIX) and p.requires_grad]
    ids = {id(p) for p in mixture}
    out = []
    for g in groups:
        params = [p for p in g['params'] if id(p) not in ids]
        if params:
            out.append({**g, 'params': params})
    if mixture:
        out.append({'params': mixture, 'weight_decay': 0., 'lr': lr * mixture_lr_mult, 'group_name': 'mixture'})
    return out


def create_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """timm.optim.create_optimizer_v2 with timm's optimizer flags and the mixture group."""
    kwargs = optimizer_kwargs(cfg=args)
    groups = mixture_param_groups(
        model, kwargs.pop('weight_decay'), args.lr, args.mixture_lr_mult, kwargs.pop('layer_decay', None))
    kwargs.pop('layer_decay_min_scale', None)
    kwargs.pop('layer_decay_no_opt_scale', None)
    return create_optimizer_v2(groups, **kwargs)


def resolve_lr(args: argparse.Namespace) -> None:
    """Set args.lr from --lr-base when --lr is not given (timm's rule: scaled by the global batch)."""
    if args.lr is not None:
        return
    global_batch = args.batch_size * args.world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    if scale == 'sqrt':
        ratio = ratio ** 0.5
    args.lr = args.lr_base * ratio
    _logger.info(f'Learning rate ({args.lr}) from base {args.lr_base} x {scale} batch ratio ({global_batch}/{args.lr_base_size})')


# --- checkpoints -------------------------------------------------------------------------------------
def atomic_save(obj: Any, path: str) -> None:
    """torch.save to `path` atomically: a temporary file in the same folder, fsync, then os.replace.

    A process killed at any point leaves either the old file or the new one, never a partial file.
    """
    atomic_write_bytes(_serialize(obj), path)


def _serialize(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def atomic_write_bytes(data: bytes, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.tmp-' + os.path.basename(path) + '-', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Load a checkpoint dict on CPU (ConfigError naming the file when missing or unreadable)."""
    if not os.path.isfile(path):
        raise ConfigError(f'checkpoint not found: {path}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ConfigError(f'cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}') from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f'checkpoint {path} is not a dict (got {type(ckpt).__name__})')
    return ckpt


class CheckpointKeeper:
    """Writes `last.pth.tar`, `model_best.pth.tar` and the `hist` best `checkpoint-<epoch>.pth.tar`.

    As timm's --checkpoint-hist: the per-epoch files kept are the best `hist` by the eval metric
    (higher is better unless `decreasing`); without a metric the most recent are kept.
    """

    def __init__(self, folder: str, hist: int = 10, decreasing: bool = False):
        self.folder, self.hist, self.decreasing = folder, max(int(hist), 0), decreasing
        self.kept: List[Tuple[int, Optional[float]]] = []  # (epoch, metric)
        self.best: Optional[Tuple[int, Optional[float]]] = None
        for path in glob.glob(os.path.join(folder, 'checkpoint-*.pth.tar')):  # a resumed run keeps its history
            m = re.match(r'checkpoint-(\d+)\.pth\.tar$', os.path.basename(path))
            if m:
                self.kept.append((int(m.group(1)), _peek_metric(path)))
        best = os.path.join(folder, 'model_best.pth.tar')
        if os.path.isfile(best):
            ckpt = torch.load(best, map_location='cpu', weights_only=True, mmap=True)
            self.best = (ckpt.get('epoch', -1), ckpt.get('metric'))

    def _rank(self, item: Tuple[int, Optional[float]]):
        epoch, metric = item
        if metric is None:
            return (0, epoch)
        return (1, -metric if self.decreasing else metric)

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def drop_after(self, epoch: int) -> None:
        """Forget (and delete) per-epoch checkpoints newer than `epoch`: a resumed run rewrites them."""
        for e, _ in [k for k in self.kept if k[0] > epoch]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(f'checkpoint-{e}.pth.tar'))
        self.kept = [k for k in self.kept if k[0] <= epoch]

    def save(self, state: Dict[str, Any], epoch: int, metric: Optional[float]) -> List[str]:
        """Write this epoch's checkpoint files; return the paths written."""
        data = _serialize(state)
        written = []
        self.kept = [k for k in self.kept if k[0] != epoch]
        if self.hist > 0:
            self.kept.append((epoch, metric))
            self.kept.sort(key=self._rank, reverse=True)
            if (epoch, metric) in self.kept[:self.hist]:
                atomic_write_bytes(data, self.path(f'checkpoint-{epoch}.pth.tar'))
                written.append(self.path(f'checkpoint-{epoch}.pth.tar'))
            for e, _ in self.kept[self.hist:]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path(f'checkpoint-{e}.pth.tar'))
            self.kept = self.kept[:self.hist]
        if self.best is None or self._rank((epoch, metric)) >= self._rank(self.best):
            atomic_write_bytes(data, self.path('model_best.pth.tar'))
            written.append(self.path('model_best.pth.tar'))
            self.best = (epoch, metric)
        atomic_write_bytes(data, self.path('last.pth.tar'))  # last, so it never points past the others
        written.append(self.path('last.pth.tar'))
        return written


def _peek_metric(path: str) -> Optional[float]:
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True).get('metric')
    except Exception:
        return None


def model_args_of(model: nn.Module, num_classes: int, in_chans: int, model_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """kwargs that rebuild `model` with timm.create_model(arch, **kwargs): classes, channels, schedule."""
    args = dict(model_kwargs or {})
    args.update(num_classes=num_classes, in_chans=in_chans)
    if hasattr(model, 'schedule_args'):
        args.update(model.schedule_args())
    return args


# --- schedule logging -----------------------------------------------------------------------------
def mixture_alphas(model: nn.Module) -> Dict[str, torch.Tensor]:
    """alpha (L, K) of every mixture of an isomix model; {} for other models."""
    if not hasattr(model, 'mixtures'):
        return {}
    with torch.no_grad():
        return {name: m.alpha().detach().float().cpu() for name, m in model.mixtures().items()}


def schedule_report(model: nn.Module) -> List[str]:
    """One line per mixture: the argmax order and each layer's entropy of alpha (nats; ln K = uniform)."""
    lines = []
    for name, a in mixture_alphas(model).items():
        entropy = (-(a * a.clamp_min(1e-12).log()).sum(-1)).clamp_min(0.)  # no '-0.000' for one-hot rows
        lines.append(
            f'{name}: order {a.argmax(-1).tolist()} entropy [{" ".join(f"{h:.3f}" for h in entropy.tolist())}] '
            f'(uniform = {math.log(a.shape[1]):.3f})')
    return lines


def log_schedule(model: nn.Module, epoch: int, logger: logging.Logger = _logger) -> None:
    for line in schedule_report(model):
        logger.info(f'Schedule (epoch {epoch}) {line}')


def write_mixture_heatmap(model: nn.Module, folder: str, epoch: int) -> Optional[str]:
    """Write `<folder>/mixtures.png` (layer x template per mixture); None for models without mixtures."""
    alphas = mixture_alphas(model)
    if not alphas:
        return None
    return plot_mixtures(alphas, os.path.join(folder, 'mixtures.png'), title=f'mixtures after epoch {epoch}')


# --- output folder -------------------------------------------------------------------------------------
def make_output_dir(args: argparse.Namespace, device: torch.device, resume_dir: Optional[str]) -> str:
    """Create (rank 0) and return the experiment folder, refusing to reuse an existing one unless
    it is the folder being resumed or --overwrite is given."""
    if args.experiment:
        name = args.experiment
    elif resume_dir and not args.output:
        return _check_writable(resume_dir, args, device)
    else:
        name = '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model),
                         str(args.input_size[-1] if args.input_size else (args.img_size or 'default'))])
    folder = os.path.join(args.output or './output/train', name)
    error = ''
    if is_primary(args):  # rank 0 alone looks: the others would see the folder rank 0 is creating
        exists = os.path.isdir(folder) and bool(os.listdir(folder))
        same_as_resume = resume_dir is not None and os.path.realpath(folder) == os.path.realpath(resume_dir)
        if exists and not same_as_resume and not getattr(args, 'overwrite', False):
            error = (f'experiment directory {folder} already exists; pass --resume '
                     f'{os.path.join(folder, "last.pth.tar")} to continue it, --overwrite to train into it anyway, '
                     f'or another --experiment')
        elif os.path.exists(folder) and not os.path.isdir(folder):
            error = f'output path {folder} exists and is not a directory'
    if not _all_agree(not error, args, device):
        raise ConfigError(error or f'experiment directory {folder} cannot be used (see rank 0)')
    return _check_writable(folder, args, device)


def _check_writable(folder: str, args: argparse.Namespace, device: torch.device) -> str:
    error = ''
    if is_primary(args):
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix='.probe-'):
                pass
        except OSError as e:
            error = f'cannot write to output directory {folder}: {e.strerror or e}'
    if not _all_agree(not error, args, device):
        raise ConfigError(error or f'cannot write to output directory {folder} (rank 0 failed)')
    return folder


# --- one epoch ----------------------------------------------------------------------------------------
class _ProgressBar:
    """A one-line progress bar on stderr, only when it is a terminal (log lines still go to the log)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()

    def update(self, text: str, frac: float) -> None:
        if self.enabled:
            n = int(30 * frac)
            sys.stderr.write(f'\r[{"#" * n}{"." * (30 - n)}] {text}'[:160].ljust(100))
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write('\n')
            sys.stderr.flush()


def _autocast(args: argparse.Namespace, device: torch.device):
    if not args.amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, args.amp_dtype))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, 'module') else model


def train_one_epoch(
        epoch: int,
        model: nn.Module,
        loader: Iterable,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        args: argparse.Namespace,
        device: torch.device,
        lr_scheduler=None,
        model_ema: Optional[ModelEmaV3] = None,
        mixup_fn: Optional[Mixup] = None,
        loss_scaler: Optional[NativeScaler] = None,
        num_updates_start: int = 0,
        logger: logging.Logger = _logger,
) -> Dict[str, float]:
    """One pass over `loader` with gradient accumulation, AMP, clipping, EMA and per-update scheduling.

    Logs timm-style lines every `args.log_interval` updates (loss, throughput, lr, ETA).
    """
    if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        mixup_fn.mixup_enabled = False
    model.train()
    accum = max(args.grad_accum_steps, 1)
    num_batches = len(loader)
    last_idx = num_batches - 1
    num_updates = num_updates_start
    last_accum = num_batches % accum or accum
    last_accum_start = num_batches - last_accum
    losses, batch_time, data_time = AverageMeter(), AverageMeter(), AverageMeter()
    bar = _ProgressBar(is_primary(args))
    start = end = time.time()
    optimizer.zero_grad()
    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == last_idx
        need_update = last_batch or (batch_idx + 1) % accum == 0
        steps = last_accum if batch_idx >= last_accum_start else accum
        if not getattr(loader, 'is_prefetcher', False) or input.device != device:
            input, target = input.to(device), target.to(device)
        if mixup_fn is not None:
            input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        data_time.update(time.time() - end)
        sync = model.no_sync() if (args.distributed and not need_update) else contextlib.nullcontext()
        with sync:
            with _autocast(args, device):
                output = model(input)
                loss = loss_fn(output, target)
            scaled = loss / steps
            if loss_scaler is not None:
                loss_scaler(scaled, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=model_parameters(model, exclude_head='agc' in args.clip_mode),
                            need_update=need_update)
            else:
                scaled.backward()
                if need_update:
                    if args.clip_grad is not None:
                        dispatch_clip_grad(model_parameters(model, exclude_head='agc' in args.clip_mode),
                                           value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f'loss is {loss.item()} at epoch {epoch} batch {batch_idx}: lower --lr or check the data')
        losses.update(loss.item(), input.size(0))
        if not need_update:
            continue
        optimizer.zero_grad()
        num_updates += 1
        if model_ema is not None:
            model_ema.update(model, step=num_updates)
        if args.synchronize_step and device.type == 'cuda':
            torch.cuda.synchronize()
        batch_time.update(time.time() - end)
        end = time.time()
        update_idx, num_updates_epoch = batch_idx // accum, (num_batches + accum - 1) // accum
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses.avg)
        lrs = [g['lr'] for g in optimizer.param_groups if g.get('group_name') != 'mixture'] or [0.]
        lr = sum(lrs) / len(lrs)  # the mixture group's own lr is lr * --mixture-lr-mult
        images = input.size(0) * accum * args.world_size
        eta = batch_time.avg * (num_updates_epoch - update_idx - 1)
        bar.update(f'epoch {epoch} {update_idx + 1}/{num_updates_epoch} loss {losses.val:.3f} '
                   f'{images / max(batch_time.val, 1e-9):.0f} img/s eta {eta:.0f}s', (update_idx + 1) / num_updates_epoch)
        if last_batch or update_idx % args.log_interval == 0:
            if args.distributed:  # the logged loss is the mean over ranks (timm does the same)
                shown = reduce_tensor(loss.detach().float(), args.world_size).item()
            else:
                shown = losses.val
            if is_primary(args):
                logger.info(
                    f'Train: {epoch} [{update_idx:>4d}/{num_updates_epoch} '
                    f'({100. * (update_idx + 1) / num_updates_epoch:>3.0f}%)]  '
                    f'Loss: {shown:#.3g} ({losses.avg:#.3g})  '
                    f'Time: {batch_time.val:.3f}s, {images / max(batch_time.val, 1e-9):>7.2f}/s  '
                    f'({batch_time.avg:.3f}s, {images / max(batch_time.avg, 1e-9):>7.2f}/s)  '
                    f'LR: {lr:.3e}  Data: {data_time.val:.3f} ({data_time.avg:.3f})  ETA: {eta:.0f}s')
    bar.close()
    if args.distributed:
        avg = reduce_tensor(torch.tensor([losses.avg], device=device), args.world_size).item()
    else:
        avg = losses.avg
    return OrderedDict([('loss', avg), ('time', time.time() - start), ('num_updates', num_updates)])


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: Iterable,
        loss_fn: nn.Module,
        args: argparse.Namespace,
        device: torch.device,
        log_suffix: str = '',
        logger: logging.Logger = _logger,
) -> Dict[str, float]:
    """Top-1, top-5 (percent) and loss on `loader`, averaged over ranks."""
    model.eval()
    loss_m, top1_m, top5_m = AverageMeter(), AverageMeter(), AverageMeter()
    for input, target in loader:
        input, target = input.to(device), target.to(device)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with _autocast(args, device):
            output = model(input)
            if isinstance(output, (tuple, list)):
                output = output[0]
            loss = loss_fn(output, target)
        acc1, acc5 = accuracy(output, target, topk=(1, min(5, output.shape[-1])))
        if args.distributed:
            loss, acc1, acc5 = (reduce_tensor(t.float(), args.world_size) for t in (loss, acc1, acc5))
        loss_m.update(loss.item(), input.size(0))
        top1_m.update(acc1.item(), input.size(0))
        top5_m.update(acc5.item(), input.size(0))
    if is_primary(args):
        logger.info(f'Test{log_suffix}: Loss: {loss_m.avg:>6.4f}  Acc@1: {top1_m.avg:>7.3f}  Acc@5: {top5_m.avg:>7.3f}')
    return OrderedDict([('loss', loss_m.avg), ('top1', top1_m.avg), ('top5', top5_m.avg)])


# --- the whole run ---------------------------------------------------------------------------------
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


def _check_against_checkpoint(ckpt: Dict[str, Any], args: argparse.Namespace, path: str, flag: str) -> Dict[str, Any]:
    """The model kwargs stored in a checkpoint, after checking arch and --num-classes against them."""
    arch = ckpt.get('arch')
    if arch and args.model and arch != args.model:
        raise ConfigError(f'{flag} {path} holds a {arch!r} checkpoint, but --model is {args.model!r}')
    if arch and not args.model:
        args.model = arch
    model_args = dict(ckpt.get('model_args') or {})
    ck_classes = model_args.get('num_classes')
    if args.num_classes is not None and ck_classes is not None and args.num_classes != ck_classes:
        raise ConfigError(f'--num-classes {args.num_classes} contradicts {flag} {path}, which has {ck_classes} classes')
    return model_args


def train(args: argparse.Namespace, args_text: Optional[str] = None) -> Dict[str, Any]:
    """Run a whole training from parsed train.py args; return the final metrics and output paths.

    Raises ConfigError for problems the user must fix (before anything is written).
    """
    device = setup_distributed(args)
    if args.distributed:
        _logger.info(f'Distributed: process {args.rank} of {args.world_size}, device {device}')
    if not is_primary(args):
        logging.getLogger().setLevel(logging.WARNING)
    random_seed(args.seed, args.rank)
    _check_data_dir(args)

    resume_ckpt, model_args, resume_dir = None, {}, None
    if args.resume:
        resume_ckpt = load_checkpoint_file(args.resume)
        model_args = _check_against_checkpoint(resume_ckpt, args, args.resume, '--resume')
        resume_dir = os.path.dirname(os.path.abspath(args.resume))
    elif args.initial_checkpoint:
        init = load_checkpoint_file(args.initial_checkpoint)
        model_args = _check_against_checkpoint(init, args, args.initial_checkpoint, '--initial-checkpoint')
        del init
    args.model = args.model or 'resnet50'
    if not timm.is_model(args.model):
        raise ConfigError(f'unknown model {args.model!r} (see timm.list_models("isomix_*"))')
    if args.grad_accum_steps < 1:
        raise ConfigError(f'--grad-accum-steps must be at least 1, got {args.grad_accum_steps}')

    # Datasets first: the class count of a folder dataset is the model's default number of classes.
    dataset_kwargs = dict(class_map=args.class_map, batch_size=args.batch_size, seed=args.seed,
                          input_img_mode=args.input_img_mode, input_key=args.input_key, target_key=args.target_key)
    try:
        dataset_train = create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                                       num_samples=args.train_num_samples, **dataset_kwargs)
        dataset_eval = None
        if args.val_split:
            dataset_eval = create_dataset(args.dataset, root=args.data_dir, split=args.val_split, is_training=False,
                                          num_samples=args.val_num_samples, **dataset_kwargs)
    except (FileNotFoundError, RuntimeError, AssertionError) as e:
        raise ConfigError(f'cannot read dataset {args.dataset or "(folder)"} at {args.data_dir}: {e}') from None
    if len(dataset_train) == 0:
        raise ConfigError(f'no training images found in {args.data_dir} (split {args.train_split!r})')
    if 'num_classes' not in model_args and args.num_classes is None:
        args.num_classes = _num_classes_of(dataset_train)
        if args.num_classes is not None:
            _logger.info(f'--num-classes not given: {args.num_classes} classes found in the training split')

    output_dir = make_output_dir(args, device, resume_dir)

    # Model: a resumed run is rebuilt from the checkpoint's kwargs (schedule included).
    create_kwargs = dict(model_args)
    create_kwargs.update(args.model_kwargs or {})
    for key, value in (('num_classes', args.num_classes), ('in_chans', args.in_chans), ('global_pool', args.gp),
                       ('drop_rate', args.drop), ('drop_path_rate', args.drop_path),
                       ('drop_block_rate', args.drop_block), ('bn_momentum', args.bn_momentum), ('bn_eps', args.bn_eps)):
        if value is not None and not (key == 'drop_rate' and value == 0.):
            create_kwargs[key] = value
    try:
        model = timm.create_model(
            args.model, pretrained=args.pretrained, pretrained_cfg_overlay=dict(file=args.pretrained_path)
            if args.pretrained_path else None, checkpoint_path=args.initial_checkpoint or None, **create_kwargs)
    except TypeError as e:
        raise ConfigError(f'model {args.model!r} does not accept these arguments: {e}') from None
    if args.head_init_scale is not None or args.head_init_bias is not None:
        with torch.no_grad():
            head = model.get_classifier()
            if args.head_init_scale is not None:
                head.weight.mul_(args.head_init_scale)
                head.bias.mul_(args.head_init_scale)
            if args.head_init_bias is not None:
                nn.init.constant_(head.bias, args.head_init_bias)
    num_classes = model.num_classes
    in_chans = getattr(model, 'in_chans', None) or (args.in_chans or 3)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    data_config = resolve_data_config(vars(args), model=model, verbose=is_primary(args))
    if is_primary(args):
        _logger.info(f'Model {args.model} created, params: {sum(p.numel() for p in model.parameters()):,}')

    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    resolve_lr(args)
    optimizer = create_optimizer(model, args)
    loss_scaler = NativeScaler(device=device.type) if args.amp and args.amp_dtype == 'float16' else None

    start_epoch = 0
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt['state_dict'])
        if not args.no_resume_opt:
            if 'optimizer' in resume_ckpt:
                optimizer.load_state_dict(resume_ckpt['optimizer'])
            if loss_scaler is not None and 'amp_scaler' in resume_ckpt:
                loss_scaler.load_state_dict(resume_ckpt['amp_scaler'])
        start_epoch = int(resume_ckpt.get('epoch', -1)) + 1
        _logger.info(f'Resumed {args.resume} (epoch {start_epoch - 1} done)')

    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                               device='cpu' if args.model_ema_force_cpu else None)
        if resume_ckpt is not None and resume_ckpt.get('state_dict_ema') is not None:
            model_ema.module.load_state_dict(resume_ckpt['state_dict_ema'])

    if args.distributed:
        # device_ids only on CUDA: DDP rejects device_ids for CPU modules (timm's script passes them).
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == 'cuda' else None)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)

    mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if mixup_active:
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

    train_loss_fn = create_classification_loss(
        loss_type='bce' if args.bce_loss else None, smoothing=args.smoothing, soft_targets=mixup_active,
        bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum, pos_weight=args.bce_pos_weight).to(device)
    eval_loss_fn = nn.CrossEntropyLoss().to(device)

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
        updates_per_epoch=updates_per_epoch)
    if args.start_epoch is not None and resume_ckpt is None:
        start_epoch = args.start_epoch
    if lr_scheduler is not None:
        if resume_ckpt is not None and not args.no_resume_opt and resume_ckpt.get('scheduler'):
            lr_scheduler.load_state_dict(resume_ckpt['scheduler'])
        if start_epoch > 0:  # creating the scheduler reset the groups' lr to the base values: set this epoch's
            if args.sched_on_updates:
                lr_scheduler.step_update(start_epoch * updates_per_epoch)
            else:
                lr_scheduler.step(start_epoch)
    if is_primary(args):
        _logger.info(f'Scheduled epochs: {num_epochs} ({updates_per_epoch} updates per epoch); '
                     f'training {start_epoch}..{num_epochs - 1} into {output_dir}')

    keeper = None
    summary = os.path.join(output_dir, 'summary.csv')
    if is_primary(args):
        keeper = CheckpointKeeper(output_dir, args.checkpoint_hist, decreasing=args.eval_metric == 'loss')
        if resume_ckpt is not None:
            keeper.drop_after(start_epoch - 1)
        trim_summary(summary, start_epoch)
        atomic_write_bytes((args_text or yaml.safe_dump(vars(args))).encode(), os.path.join(output_dir, 'args.yaml'))
        log_schedule(_unwrap(model), start_epoch - 1)
    results = dict(resume_ckpt.get('results') or {}) if resume_ckpt is not None else {}
    metric = resume_ckpt.get('metric') if resume_ckpt is not None else None
    del resume_ckpt
    heatmap = None
    for epoch in range(start_epoch, num_epochs):
        # Each epoch's randomness (data order, augmentation, mixup, drop-path) depends only on (seed, epoch, rank).
        random_seed(args.seed * 1000 + epoch, args.rank)
        if hasattr(loader_train, 'sampler') and hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)
        train_metrics = train_one_epoch(
            epoch, model, loader_train, optimizer, train_loss_fn, args, device, lr_scheduler=lr_scheduler,
            model_ema=model_ema, mixup_fn=mixup_fn, loss_scaler=loss_scaler,
            num_updates_start=epoch * updates_per_epoch)
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            distribute_bn(model, args.world_size, args.dist_bn == 'reduce')
        eval_metrics = None
        if loader_eval is not None:
            eval_metrics = evaluate(model, loader_eval, eval_loss_fn, args, device)
            if model_ema is not None and not args.model_ema_force_cpu:
                if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                    distribute_bn(model_ema, args.world_size, args.dist_bn == 'reduce')
                eval_metrics = evaluate(model_ema, loader_eval, eval_loss_fn, args, device, log_suffix=' (EMA)')
            metric = eval_metrics[args.eval_metric]
            results = {k: eval_metrics[k] for k in ('top1', 'top5', 'loss')}
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, metric)
        if is_primary(args):
            lrs = [g['lr'] for g in optimizer.param_groups if g.get('group_name') != 'mixture'] or [0.]
            update_summary(epoch, {'loss': train_metrics['loss']}, eval_metrics or {}, filename=summary,
                           lr=sum(lrs) / len(lrs), write_header=not os.path.exists(summary))
            log_schedule(_unwrap(model), epoch)
            heatmap = write_mixture_heatmap(_unwrap(model), output_dir, epoch)
            state = {
                'epoch': epoch,
                'arch': args.model,
                'model_args': model_args_of(_unwrap(model), num_classes, in_chans, args.model_kwargs),
                'state_dict': _unwrap(model).state_dict(),
                'optimizer': optimizer.state_dict(),
                'scheduler': lr_scheduler.state_dict() if lr_scheduler is not None else None,
                'args': _plain(vars(args)),
                'metric': metric if eval_metrics is not None else None,
                'data_config': _plain(data_config),
                'results': results,
                'version': 2,
            }
            if model_ema is not None:
                state['state_dict_ema'] = model_ema.module.state_dict()
            if loss_scaler is not None:
                state['amp_scaler'] = loss_scaler.state_dict()
            keeper.save(state, epoch, state['metric'])
            _logger.info(f'Saved checkpoint of epoch {epoch} to {keeper.path("last.pth.tar")}')
        if args.distributed:
            torch.distributed.barrier()
    if is_primary(args) and heatmap is None:
        heatmap = write_mixture_heatmap(_unwrap(model), output_dir, num_epochs - 1)
    if args.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return {'output_dir': output_dir, 'results': results, 'metric': metric, 'heatmap': heatmap,
            'epochs': num_epochs}


def _plain(value: Any) -> Any:
    """A copy with only plain Python types (so checkpoints load with torch.load(weights_only=True))."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
