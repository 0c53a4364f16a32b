"""Residual blocks whose parameters come from a template bank.

Each class is one *executed layer*: it owns only its normalization statistics (BatchNorm
running mean/var, kept in an affine-free `nn.BatchNorm2d`) and its drop-path; its convolution
kernels and normalization scale/shift arrive at call time as `params`, a dict of tensors shaped
like the parameters of timm's block of the same name (`conv1.weight`, `bn1.weight`, ...), mixed from
the bank or taken from one template. The computation is the same as timm's `BasicBlock` and
`Bottleneck` with stride 1 and an identity shortcut, so their weights run here unchanged.
"""
from typing import Dict, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import DropPath

__all__ = ['BasicLayer', 'BottleneckLayer', 'batch_norm']


def batch_norm(x: torch.Tensor, stats: nn.BatchNorm2d, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """BatchNorm with this layer's statistics and the bank's (mixed) scale and shift, in one fused op."""
    return F.batch_norm(
        x, stats.running_mean, stats.running_var, weight, bias,
        stats.training or not stats.track_running_stats, stats.momentum, stats.eps)


def _init_template(params: Dict[str, torch.Tensor], last_norm: str, zero_init_last: bool) -> None:
    """timm's ResNet init: He-normal (fan-out) kernels, BN scale 1 and shift 0, last BN scale 0."""
    with torch.no_grad():
        for name, p in params.items():
            if p.ndim > 1:
                nn.init.kaiming_normal_(p, mode='fan_out', nonlinearity='relu')
            elif name.endswith('.weight'):
                p.fill_(0. if zero_init_last and name == f'{last_norm}.weight' else 1.)
            else:
                p.zero_()


class BasicLayer(nn.Module):
    """conv3x3-BN-act-conv3x3-BN, plus identity, then act (timm's BasicBlock at stride 1)."""

    def __init__(
            self,
            channels: int,
            act_layer: Type[nn.Module] = nn.ReLU,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels, affine=False, **dd)
        self.act1 = act_layer(inplace=True)
        self.bn2 = nn.BatchNorm2d(channels, affine=False, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.act2 = act_layer(inplace=True)

    @staticmethod
    def template_shapes(channels: int) -> Dict[str, Tuple[int, ...]]:
        c = channels
        return {
            'conv1.weight': (c, c, 3, 3), 'bn1.weight': (c,), 'bn1.bias': (c,),
            'conv2.weight': (c, c, 3, 3), 'bn2.weight': (c,), 'bn2.bias': (c,),
        }

    @staticmethod
    def init_template(params: Dict[str, torch.Tensor], zero_init_last: bool = True) -> None:
        _init_template(params, 'bn2', zero_init_last)

    def forward(self, x: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        shortcut = x
        x = F.conv2d(x, params['conv1.weight'], padding=1)
        x = self.act1(batch_norm(x, self.bn1, params['bn1.weight'], params['bn1.bias']))
        x = F.conv2d(x, params['conv2.weight'], padding=1)
        x = self.drop_path(batch_norm(x, self.bn2, params['bn2.weight'], params['bn2.bias']))
        x += shortcut  # in place, as timm's blocks: no new activation-sized tensor (BN backward needs not its output)
        return self.act2(x)


class BottleneckLayer(nn.Module):
    """conv1x1-BN-act-conv3x3-BN-act-conv1x1-BN, plus identity, then act (timm's Bottleneck at stride 1)."""

    def __init__(
            self,
            channels: int,
            width: int,
            act_layer: Type[nn.Module] = nn.ReLU,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.bn1 = nn.BatchNorm2d(width, affine=False, **dd)
        self.act1 = act_layer(inplace=True)
        self.bn2 = nn.BatchNorm2d(width, affine=False, **dd)
        self.act2 = act_layer(inplace=True)
        self.bn3 = nn.BatchNorm2d(channels, affine=False, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.act3 = act_layer(inplace=True)

    @staticmethod
    def template_shapes(channels: int, width: int) -> Dict[str, Tuple[int, ...]]:
        c, w = channels, width
        return {
            'conv1.weight': (w, c, 1, 1), 'bn1.weight': (w,), 'bn1.bias': (w,),
            'conv2.weight': (w, w, 3, 3), 'bn2.weight': (w,), 'bn2.bias': (w,),
            'conv3.weight': (c, w, 1, 1), 'bn3.weight': (c,), 'bn3.bias': (c,),
        }

    @staticmethod
    def init_template(params: Dict[str, torch.Tensor], zero_init_last: bool = True) -> None:
        _init_template(params, 'bn3', zero_init_last)

    def forward(self, x: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        shortcut = x
        x = F.conv2d(x, params['conv1.weight'])
        x = self.act1(batch_norm(x, self.bn1, params['bn1.weight'], params['bn1.bias']))
        x = F.conv2d(x, params['conv2.weight'], padding=1)
        x = self.act2(batch_norm(x, self.bn2, params['bn2.weight'], params['bn2.bias']))
        x = F.conv2d(x, params['conv3.weight'])
        x = self.drop_path(batch_norm(x, self.bn3, params['bn3.weight'], params['bn3.bias']))
        x += shortcut  # in place, as timm's blocks (see BasicLayer)
        return self.act3(x)
