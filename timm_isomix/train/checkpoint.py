"""Checkpoints and experiment folders of train.py.

Checkpoints are self-describing ('arch' + 'model_args' rebuild the model with timm.create_model) and
written atomically, so a kill never leaves a half-written checkpoint in place of a good one.
"""
import argparse
import contextlib
import glob
import os
import re
import tempfile
from datetime import datetime
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from timm.models import safe_model_name

from ..models._hub import torch_load_like_timm
from .config import ConfigError
from .distributed import all_agree, is_primary
from .files import atomic_save, atomic_write_bytes, serialize

__all__ = [
    'atomic_save', 'atomic_write_bytes', 'load_checkpoint_file', 'CheckpointKeeper', 'model_args_of',
    'check_against_checkpoint', 'make_output_dir', 'plain',
]


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Load a checkpoint dict on CPU as timm loads it (weights only; timm's train.py checkpoints too);
    ConfigError naming the file when missing or unreadable."""
    if not os.path.isfile(path):
        raise ConfigError(f'checkpoint not found: {path}')
    try:
        ckpt = torch_load_like_timm(path)
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
        data = serialize(state)
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



def check_against_checkpoint(ckpt: Dict[str, Any], args: argparse.Namespace, path: str, flag: str) -> Dict[str, Any]:
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
    if not all_agree(not error, args, device):
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
    if not all_agree(not error, args, device):
        raise ConfigError(error or f'cannot write to output directory {folder} (rank 0 failed)')
    return folder



def plain(value: Any) -> Any:
    """A copy with only plain Python types (so checkpoints load with torch.load(weights_only=True))."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
