"""Device and process-group set-up for train.py, on timm's `init_distributed_device` (CPU runs use gloo)."""
import argparse

import torch

from timm.utils import init_distributed_device

from .config import ConfigError

__all__ = ['setup_distributed', 'finish_distributed', 'is_primary', 'all_agree', 'unwrap']


def setup_distributed(args: argparse.Namespace) -> torch.device:
    """Pick the device and, under torchrun, join the process group (NCCL on CUDA, gloo otherwise).

    Sets args.device, args.distributed, args.world_size, args.rank, args.local_rank.
    """
    if not args.device:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError(f'--device {args.device}: CUDA is not available on this machine (use --device cpu)')
    return init_distributed_device(args)


def finish_distributed(args: argparse.Namespace) -> None:
    """Wait for every rank, then leave the process group.

    A rank that exits while the group is alive (rank 0 still writing its outputs) can abort in gloo's
    destructor, and torchrun then kills the others: every rank leaves together instead.
    """
    if getattr(args, 'distributed', False):
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def is_primary(args: argparse.Namespace) -> bool:
    return getattr(args, 'rank', 0) == 0



def all_agree(ok: bool, args: argparse.Namespace, device: torch.device) -> bool:
    """True when `ok` holds on every rank (so all ranks fail together instead of hanging)."""
    if not getattr(args, 'distributed', False):
        return ok
    flag = torch.tensor([1 if ok else 0], device=device if device.type == 'cuda' else 'cpu')
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())



def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, 'module') else model
