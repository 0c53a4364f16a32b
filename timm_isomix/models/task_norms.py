"""A task's own normalization around shared modules: statistics (and a patch) for the stem and the unbanked blocks.

The banks' executed layers already take their statistics from a task's `Schedule`. The modules outside the banks
(the stem's BatchNorm, and in a staged backbone each stage's first block: timm's `BasicBlock` or `Bottleneck` with
its stride and projection) are shared by every task; here each task gets, for each of their BatchNorms, an
affine-free BatchNorm holding its own running statistics, and with a patch its own scale and shift
(`BlockNorms.patch_norms`). `run_block` runs a shared block with a task's norms: the block's convolutions, the
task's statistics, the patch's (or the block's) scale and shift.
"""
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.resnet import BasicBlock, Bottleneck

from ..blocks import batch_norm

__all__ = ['stats_of', 'block_norms', 'BlockNorms', 'run_block']


def stats_of(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """An affine-free BatchNorm holding a copy of `bn`'s running statistics."""
    stats = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=False,
                           device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    stats.load_state_dict({k: v for k, v in bn.state_dict().items() if k not in ('weight', 'bias')})
    return stats


def block_norms(block: nn.Module) -> Dict[str, nn.BatchNorm2d]:
    """The BatchNorms of an unbanked block by key ('bn1', 'bn2', 'bn3', 'downsample'), in the order they run.

    Raises ValueError for a block this module cannot run with a task's norms (anything but timm's BasicBlock
    or Bottleneck with plain BatchNorms, no attention, anti-aliasing or DropBlock: the blocks isomix builds).
    """
    if not isinstance(block, (BasicBlock, Bottleneck)):
        raise ValueError(f'an unbanked block must be timm\'s BasicBlock or Bottleneck, got {type(block).__name__}')
    if block.se is not None or not isinstance(block.aa, nn.Identity) or not isinstance(block.drop_block, nn.Identity):
        raise ValueError('an unbanked block with attention, anti-aliasing or DropBlock has no per-task norms here')
    norms = OrderedDict((name, getattr(block, name)) for name in ('bn1', 'bn2', 'bn3') if hasattr(block, name))
    if block.downsample is not None:
        norms['downsample'] = block.downsample[1]
    bad = [k for k, bn in norms.items() if type(bn) is not nn.BatchNorm2d]
    if bad:
        raise ValueError(f'the unbanked block\'s norms {bad} are not BatchNorm2d')
    return norms


class BlockNorms(nn.Module):
    """One task's norms for one unbanked block: its statistics per BatchNorm, and optionally its patch."""

    def __init__(self, block: nn.Module, patch: bool = False):
        super().__init__()
        shared = block_norms(block)
        self.norms = nn.ModuleDict({key: stats_of(bn) for key, bn in shared.items()})
        self.widths = [bn.num_features for bn in shared.values()]
        # (2, sum of widths): scale (row 0) and shift (row 1) of every BatchNorm in block_norms' order. None: the block's.
        self.register_parameter('patch_norms', None)
        if patch:
            self.set_patch(block)

    @torch.no_grad()
    def set_patch(self, block: nn.Module, rows: Optional[torch.Tensor] = None) -> None:
        """Own scale and shift: `rows`, or (None) a copy of the block's."""
        if rows is None:
            shared = block_norms(block).values()
            rows = torch.stack([torch.cat([bn.weight for bn in shared]), torch.cat([bn.bias for bn in shared])])
        self.patch_norms = nn.Parameter(rows.detach().clone())

    def affine(self, block: nn.Module) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """key -> (scale, shift) this task runs: the patch's, else the shared block's."""
        if self.patch_norms is None:
            return {key: (bn.weight, bn.bias) for key, bn in block_norms(block).items()}
        scale, shift = self.patch_norms[0].split(self.widths), self.patch_norms[1].split(self.widths)
        return {key: (w, b) for key, w, b in zip(self.norms, scale, shift)}


def run_block(block: nn.Module, x: torch.Tensor, norms: BlockNorms) -> torch.Tensor:
    """The shared `block` (timm's BasicBlock or Bottleneck) with a task's statistics and scale and shift."""
    affine = norms.affine(block)

    def bn(key: str, y: torch.Tensor) -> torch.Tensor:
        return batch_norm(y, norms.norms[key], *affine[key])

    y = block.act1(bn('bn1', block.conv1(x)))
    if isinstance(block, Bottleneck):
        y = block.act2(bn('bn2', block.conv2(y)))
        y, act = bn('bn3', block.conv3(y)), block.act3
    else:
        y, act = bn('bn2', block.conv2(y)), block.act2
    if block.drop_path is not None:
        y = block.drop_path(y)
    shortcut = bn('downsample', block.downsample[0](x)) if block.downsample is not None else x
    y += shortcut  # in place, as timm's blocks
    return act(y)
