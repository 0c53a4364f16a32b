"""One training epoch and one evaluation pass, timm-style (accumulation, AMP, clipping, EMA, per-update
lr schedule, logging every --log-interval updates)."""
import argparse
import contextlib
import logging
import math
import sys
import time
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import Mixup
from timm.models import model_parameters
from timm.utils import AverageMeter, ModelEmaV3, NativeScaler, accuracy, dispatch_clip_grad, reduce_tensor

from ..models.routers import Router, routing_loss
from .distributed import is_primary, unwrap
from .optim import model_lr

__all__ = ['train_one_epoch', 'evaluate', 'autocast']

_logger = logging.getLogger('train')


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


def autocast(args: argparse.Namespace, device: torch.device):
    if not args.amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, args.amp_dtype))



def _log_update(epoch, update_idx, num_updates_epoch, last_batch, loss, losses, batch_time, data_time, optimizer,
                images, args, bar, logger) -> None:
    """The progress bar after every update; a timm-style log line every --log-interval updates."""
    lr = model_lr(optimizer)
    eta = batch_time.avg * (num_updates_epoch - update_idx - 1)
    bar.update(f'epoch {epoch} {update_idx + 1}/{num_updates_epoch} loss {losses.val:.3f} '
               f'{images / max(batch_time.val, 1e-9):.0f} img/s eta {eta:.0f}s', (update_idx + 1) / num_updates_epoch)
    if not (last_batch or update_idx % args.log_interval == 0):
        return
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
    routers = [m for m in unwrap(model).modules() if isinstance(m, Router)]
    for batch_idx, (input, target) in enumerate(loader):
        for router in routers:  # the Gumbel temperature schedule follows the training progress
            router.set_progress((epoch + batch_idx / num_batches) / max(args.epochs, 1))
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
            with autocast(args, device):
                output = model(input)
                loss = loss_fn(output, target)
            extra = routing_loss(routers, output, target)
            scaled = (loss if extra is None else loss + extra) / steps
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
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses.avg)
        _log_update(epoch, batch_idx // accum, (num_batches + accum - 1) // accum, last_batch, loss, losses,
                    batch_time, data_time, optimizer, input.size(0) * accum * args.world_size, args, bar, logger)
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
        with autocast(args, device):
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


