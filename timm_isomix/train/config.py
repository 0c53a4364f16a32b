"""Command-line and YAML configuration of train.py, with timm's flag names and meanings.

Flags are spelled as in timm's own `train.py` (a timm hparams YAML uses the flag's `dest` as key,
e.g. `batch_size`, `model_ema_decay`), so a timm recipe or a timm `args.yaml` runs unchanged. YAML values
are read as timm's argparse reads them: a string is converted by the flag's type (PyYAML reads `3e-4`
as a string), and a whole float is accepted for an integer flag (`warmup_epochs: 5.0`). Keys of timm's
train.py (current or older) whose feature this trainer lacks (NaFlex, distillation, wandb, ...) are
accepted at timm's default value, which leaves the feature off, and refused otherwise. Unlike timm, a key
that no train.py knows, or a value of the wrong type, is an error rather than silently ignored (a typo
would otherwise train another recipe than the one written).

Flags added for isomix: `--mixture-lr-mult`, `--tasks`, `--overwrite`, and the router group (Routing
Networks: `--routing`, `--router`, `--router-lr`, `--router-*`), whose model settings become model kwargs
(`routing`, `router`, `router_args`), so checkpoints rebuild the routed model.

Precedence, as in timm: a flag given on the command line overrides the `-c` file, which overrides the
flags' defaults (`command_line_flags` tells which flags the command line gave, for `--tasks`, whose task
file sits between the two). A wrong flag or value is reported on one line (ConfigError, exit status 2)
rather than with argparse's usage text.
"""
import argparse
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import yaml
from timm.utils import ParseKwargs

__all__ = ['ConfigError', 'OneLineArgumentParser', 'KwargsAction', 'build_train_parser', 'parse_train_args',
           'check_config', 'load_config', 'yaml_problem', 'fold_router_args', 'command_line_flags']


class ConfigError(ValueError):
    """A configuration problem the user must fix: reported as one line, exit status 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (an unknown flag, a value of the wrong type, a missing argument) raise
    ConfigError with argparse's message, for the script to print as one line and exit with status 2."""

    def error(self, message: str):
        raise ConfigError(message)


class KwargsAction(ParseKwargs):
    """timm's `--model-kwargs key=value ...` (values read as Python literals, else kept as strings), with an
    item that is not `key=value` reported as a wrong value of the flag."""

    def __call__(self, parser, namespace, values, option_string=None):
        bad = [v for v in values if v and '=' not in v]
        if bad:
            raise argparse.ArgumentError(self, f'expected key=value items, got {bad[0]!r}')
        super().__call__(parser, namespace, values, option_string)


# Keys of timm's train.py (its main branch, aa4b5850, and older versions' args.yaml) whose feature this
# trainer does not implement, with timm's default: accepted at that value (the feature stays off), so timm
# recipes and args.yaml files run unchanged; any other value is refused, naming the key.
INERT_KEYS = {
    # older timm versions only
    'apex_amp': False, 'native_amp': False, 'bn_tf': False,
    # timm main
    'no_ddp_bb': False, 'tta': 0, 'local_rank': 0, 'save_images': False, 'log_wandb': False, 'torchscript': False,
    'fuser': '', 'fast_norm': False, 'split_bn': False, 'jsd_loss': False, 'aug_splits': 0,
    'dataset_download': False, 'use_multi_epochs_loader': False, 'recovery_interval': 0,
    'epoch_repeats': 0., 'drop_connect': None, 'dataset_trust_remote_code': False,
    'model_dtype': None, 'layer_decay_min_scale': 0, 'layer_decay_no_opt_scale': None, 'val_interval': 1,
    'wandb_project': None, 'wandb_tags': [], 'wandb_resume_id': '',
    'train_img_sizes': None, 'train_batch_sizes': None, 'train_size_probs': None, 'train_size_schedule': 'constant',
    'train_size_schedule_spread': 0.65, 'train_size_random_mix': 0.1, 'train_batches_per_epoch': None,
    'variable_batch_loss_scale': 'none',
    'naflex_loader': False, 'naflex_train_seq_lens': [128, 256, 576, 784, 1024], 'naflex_max_seq_len': 576,
    'naflex_patch_sizes': None, 'naflex_patch_size_probs': None, 'naflex_loss_scale': 'linear',
    'naflex_patchify_channels_first': False,
    'kd_model_name': None, 'kd_distill_type': 'logit', 'kd_loss_type': 'kl', 'distill_loss_weight': None,
    'task_loss_weight': None, 'kd_temperature': 4.0, 'kd_student_feature_dim': None,
    'kd_teacher_feature_dim': None, 'kd_token_distill_type': 'soft',
}


def build_train_parser() -> argparse.ArgumentParser:
    """train.py's parser: timm's train.py flags this trainer supports, plus the isomix ones."""
    p = OneLineArgumentParser(
        description='Train an isomix (or any timm) model with timm\'s data, optim, scheduler and utils.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML config whose keys set the flags\' defaults')
    _add_dataset_args(p.add_argument_group('Dataset'))
    _add_model_args(p.add_argument_group('Model'))
    _add_device_distributed_args(p.add_argument_group('Device & distributed'))
    _add_optimizer_args(p.add_argument_group('Optimizer'))
    _add_learning_rate_schedule_args(p.add_argument_group('Learning rate schedule'))
    _add_augmentation_and_regularization_args(p.add_argument_group('Augmentation and regularization'))
    _add_batch_norm_args(p.add_argument_group('Batch norm'))
    _add_model_ema_args(p.add_argument_group('Model EMA'))
    _add_router_args(p.add_argument_group('Routing Networks (isomix)'))
    _add_miscellaneous_args(p.add_argument_group('Miscellaneous'))
    return p


def _add_dataset_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument('data', nargs='?', metavar='DIR', help='path to dataset (deprecated in timm: use --data-dir)')
    g.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    g.add_argument('--dataset', metavar='NAME', default='', help='dataset type + name ("<type>/<name>"), "" = folder')
    g.add_argument('--train-split', metavar='NAME', default='train')
    g.add_argument('--val-split', metavar='NAME', default='validation', help='"" to skip evaluation')
    g.add_argument('--train-num-samples', type=int, default=None, metavar='N')
    g.add_argument('--val-num-samples', type=int, default=None, metavar='N')
    g.add_argument('--class-map', default='', type=str, metavar='FILENAME')
    g.add_argument('--input-img-mode', default=None, type=str,
                   help='PIL mode images are read in; default: RGB for 3 input channels, else L (as timm)')
    g.add_argument('--input-key', default=None, type=str)
    g.add_argument('--target-key', default=None, type=str)


def _add_model_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument('--model', default=None, type=str, metavar='MODEL',
                   help='model name (default: the --resume checkpoint\'s, else resnet50)')
    g.add_argument('--pretrained', action='store_true', default=False)
    g.add_argument('--pretrained-path', default=None, type=str)
    g.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH')
    g.add_argument('--resume', default='', type=str, metavar='PATH', help='resume model, EMA, optimizer, scheduler, epoch')
    g.add_argument('--no-resume-opt', action='store_true', default=False)
    g.add_argument('--num-classes', type=int, default=None, metavar='N')
    g.add_argument('--gp', default=None, type=str, metavar='POOL')
    g.add_argument('--img-size', type=int, default=None, metavar='N')
    g.add_argument('--in-chans', type=int, default=None, metavar='N')
    g.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N')
    g.add_argument('--crop-pct', default=None, type=float, metavar='N')
    g.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
    g.add_argument('--std', type=float, nargs='+', default=None, metavar='STD')
    g.add_argument('--interpolation', default='', type=str, metavar='NAME')
    g.add_argument('-b', '--batch-size', type=int, default=128, metavar='N')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N')
    g.add_argument('--channels-last', action='store_true', default=False)
    g.add_argument('--grad-accum-steps', type=int, default=1, metavar='N')
    g.add_argument('--grad-checkpointing', action='store_true', default=False)
    g.add_argument('--model-kwargs', nargs='*', default={}, action=KwargsAction)
    g.add_argument('--head-init-scale', default=None, type=float)
    g.add_argument('--head-init-bias', default=None, type=float)


def _add_device_distributed_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor')
    g.add_argument('--torchcompile-mode', type=str, default=None)
    g.add_argument('--device', default=None, type=str,
                   help='device ("cuda", "cpu", ...); default: cuda when available, else cpu')
    g.add_argument('--dist-backend', default=None, type=str, help='default: nccl on CUDA, gloo otherwise')
    g.add_argument('--dist-url', default='env://', type=str)
    g.add_argument('--amp', action='store_true', default=False, help='mixed precision (autocast)')
    g.add_argument('--amp-dtype', default='float16', type=str, choices=['float16', 'bfloat16'])
    g.add_argument('--synchronize-step', action='store_true', default=False)
    g.add_argument('--device-modules', default=None, type=str, nargs='+',
                   help='modules imported before the device is set up (device backends; as timm)')


def _add_optimizer_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER')
    g.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON')
    g.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    g.add_argument('--momentum', type=float, default=0.9, metavar='M')
    g.add_argument('--weight-decay', type=float, default=2e-5)
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM')
    g.add_argument('--clip-mode', type=str, default='norm', choices=['norm', 'value', 'agc'])
    g.add_argument('--layer-decay', type=float, default=None)
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=KwargsAction)
    g.add_argument('--mixture-lr-mult', type=float, default=10.0,
                   help='isomix: learning-rate multiplier of the mixture logits (their own group, no weight decay)')


def _add_learning_rate_schedule_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER')
    g.add_argument('--sched-on-updates', action='store_true', default=False)
    g.add_argument('--lr', type=float, default=None, metavar='LR', help='default: --lr-base scaled by batch size')
    g.add_argument('--lr-base', type=float, default=0.1, metavar='LR')
    g.add_argument('--lr-base-size', type=int, default=256, metavar='DIV')
    g.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE', help='"linear" or "sqrt"; "" = by optimizer')
    g.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct')
    g.add_argument('--lr-noise-pct', type=float, default=0.67)
    g.add_argument('--lr-noise-std', type=float, default=1.0)
    g.add_argument('--lr-cycle-mul', type=float, default=1.0)
    g.add_argument('--lr-cycle-decay', type=float, default=0.5)
    g.add_argument('--lr-cycle-limit', type=int, default=1)
    g.add_argument('--lr-k-decay', type=float, default=1.0)
    g.add_argument('--warmup-lr', type=float, default=1e-5)
    g.add_argument('--min-lr', type=float, default=0)
    g.add_argument('--epochs', type=int, default=300, metavar='N')
    g.add_argument('--start-epoch', default=None, type=int, metavar='N')
    g.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES')
    g.add_argument('--decay-epochs', type=float, default=90)
    g.add_argument('--warmup-epochs', type=int, default=5)
    g.add_argument('--warmup-prefix', action='store_true', default=False)
    g.add_argument('--cooldown-epochs', type=int, default=0)
    g.add_argument('--patience-epochs', type=int, default=10)
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1)


def _add_augmentation_and_regularization_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument('--no-aug', action='store_true', default=False)
    g.add_argument('--train-crop-mode', type=str, default=None)
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT')
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO')
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.)
    g.add_argument('--color-jitter', type=float, default=0.4)
    g.add_argument('--color-jitter-prob', type=float, default=None)
    g.add_argument('--grayscale-prob', type=float, default=None)
    g.add_argument('--gaussian-blur-prob', type=float, default=None)
    g.add_argument('--aa', type=str, default=None, metavar='NAME', help='AutoAugment policy, e.g. rand-m9-mstd0.5-inc1')
    g.add_argument('--aug-repeats', type=float, default=0)
    g.add_argument('--bce-loss', action='store_true', default=False)
    g.add_argument('--bce-sum', action='store_true', default=False)
    g.add_argument('--bce-target-thresh', type=float, default=None)
    g.add_argument('--bce-pos-weight', type=float, default=None)
    g.add_argument('--reprob', type=float, default=0.)
    g.add_argument('--remode', type=str, default='pixel')
    g.add_argument('--recount', type=int, default=1)
    g.add_argument('--resplit', action='store_true', default=False)
    g.add_argument('--mixup', type=float, default=0.0)
    g.add_argument('--cutmix', type=float, default=0.0)
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', type=str, default='batch', choices=['batch', 'pair', 'elem'])
    g.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N')
    g.add_argument('--smoothing', type=float, default=0.1)
    g.add_argument('--train-interpolation', type=str, default='random')
    g.add_argument('--drop', type=float, default=0.0, metavar='PCT')
    g.add_argument('--drop-path', type=float, default=None, metavar='PCT')
    g.add_argument('--drop-block', type=float, default=None, metavar='PCT')


def _add_batch_norm_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument('--bn-momentum', type=float, default=None)
    g.add_argument('--bn-eps', type=float, default=None)
    g.add_argument('--sync-bn', action='store_true', default=False)
    g.add_argument('--dist-bn', type=str, default='reduce', choices=['broadcast', 'reduce', ''])


def _add_model_ema_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument('--model-ema', action='store_true', default=False)
    g.add_argument('--model-ema-force-cpu', action='store_true', default=False)
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g.add_argument('--model-ema-warmup', action='store_true', default=False)


def _add_router_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument('--routing', default=None, choices=['task', 'input'],
                   help='a router picks one template per layer: per task, or per example (default: mixtures)')
    g.add_argument('--router', default=None, choices=['reinforce', 'wpl', 'gumbel'],
                   help='how the router learns (default with --routing: reinforce)')
    g.add_argument('--router-lr', type=float, default=None, help='router learning rate (default: --lr); no weight decay')
    g.add_argument('--router-reward', default=None, choices=['loss', 'correct'],
                   help='reward of an example: its negated loss, or +1/-1 for correct/wrong (default: loss)')
    g.add_argument('--router-cost', type=float, nargs='+', default=None, metavar='COST',
                   help='cost per route, one number or one per template (default 0)')
    g.add_argument('--router-collab', type=float, default=None, help='collaboration reward weight (default 0)')
    g.add_argument('--router-tau', type=float, default=None, help='Gumbel-softmax temperature at the start (default 1)')
    g.add_argument('--router-tau-end', type=float, default=None, help='... at the end of training (default: --router-tau)')
    g.add_argument('--router-draw', default=None, choices=['example', 'task'],
                   help='per-task routing: draw a route per example (default) or one per task and batch')
    g.add_argument('--router-hidden', type=int, default=None, help='hidden units of the per-input router (default 32)')
    g.add_argument('--router-embed', type=int, default=None, help='task embedding size of the per-input router (default 8)')


_ROUTER_ARGS = ('reward', 'cost', 'collab', 'tau', 'tau_end', 'draw', 'hidden', 'embed')


def fold_router_args(args: argparse.Namespace) -> None:
    """Turn the router flags into model kwargs (`routing`, `router`, `router_args`); ConfigError without --routing."""
    given = {k: getattr(args, f'router_{k}', None) for k in _ROUTER_ARGS}
    given = {k: (v[0] if k == 'cost' and len(v) == 1 else v) for k, v in given.items() if v is not None}
    if not args.routing:
        if args.router or given:
            raise ConfigError('--router and --router-* flags need --routing (task or input)')
        return
    kwargs = dict(args.model_kwargs or {})
    kwargs.update(routing=args.routing, router=args.router or 'reinforce')
    if given:
        kwargs['router_args'] = {**dict(kwargs.get('router_args') or {}), **given}
    args.model_kwargs = kwargs


def _add_miscellaneous_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument('--seed', type=int, default=42, metavar='S')
    g.add_argument('--worker-seeding', type=str, default='all', choices=['all', 'part'])
    g.add_argument('--log-interval', type=int, default=50, metavar='N')
    g.add_argument('--checkpoint-hist', type=int, default=10, metavar='N', help='number of best checkpoints to keep')
    g.add_argument('-j', '--workers', type=int, default=4, metavar='N')
    g.add_argument('--pin-mem', action='store_true', default=False)
    g.add_argument('--no-prefetcher', action='store_true', default=False)
    g.add_argument('--output', default='', type=str, metavar='PATH', help='default: ./output/train')
    g.add_argument('--experiment', default='', type=str, metavar='NAME', help='default: date-model-size')
    g.add_argument('--eval-metric', default='top1', type=str, choices=['top1', 'top5', 'loss'])
    g.add_argument('--overwrite', action='store_true', default=False,
                   help='isomix: allow training into an existing experiment directory without --resume')
    g.add_argument('--tasks', default='', type=str, metavar='PATH',
                   help='isomix: YAML listing tasks; trains them over one bank (timm_isomix.tasks.train_tasks)')


def _type_name(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return 'a boolean'
    if isinstance(action, ParseKwargs):
        return 'a mapping'
    kind = {int: 'an integer', float: 'a number', str: 'a string'}.get(action.type, 'a string')
    if action.nargs in ('+', '*') or isinstance(action.nargs, int):
        n = f'{action.nargs} ' if isinstance(action.nargs, int) else ''
        return f'a list of {n}{kind.split(" ", 1)[1]}s'
    return kind


def _scalar(value: Any, kind) -> Any:
    """`value` as the flag's type: strings converted as argparse converts them, whole floats for integer
    flags. Raises ValueError (or TypeError) when it does not fit."""
    if isinstance(value, bool) or (kind is not str and value is None):
        raise TypeError(value)
    if isinstance(value, str) and kind in (int, float):
        return kind(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is int and isinstance(value, int) or kind is float and isinstance(value, (int, float)):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise TypeError(value)


def _value(action: argparse.Action, value: Any) -> Any:
    """A YAML value for `action`, as its type; ValueError or TypeError when it does not fit."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise TypeError(value)
        return value
    if isinstance(action, ParseKwargs):
        if not isinstance(value, dict):
            raise TypeError(value)
        return value
    kind = action.type or str
    if action.nargs in ('+', '*') or isinstance(action.nargs, int):
        if not isinstance(value, (list, tuple)) or (isinstance(action.nargs, int) and len(value) != action.nargs):
            raise TypeError(value)
        return [_scalar(v, kind) for v in value]
    return _scalar(value, kind)


def check_config(cfg: Dict[str, Any], parser: argparse.ArgumentParser, source: str = 'config') -> Dict[str, Any]:
    """Validate YAML keys and value types against the parser; return the defaults to set.

    Raises ConfigError naming the key and what was expected.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f'{source}: expected a mapping of flag names to values, got {type(cfg).__name__}')
    actions = {a.dest: a for a in parser._actions if a.dest not in ('help', 'config')}
    defaults = {}
    for key, value in cfg.items():
        key = str(key).replace('-', '_')
        if key == 'config':  # the args.yaml of a run names the file it was configured from
            continue
        if key not in actions:
            if key in INERT_KEYS:
                if value not in (INERT_KEYS[key], None):
                    raise ConfigError(
                        f'{source}: key {key!r}={value!r} is not supported by this train.py '
                        f'(only timm\'s default {INERT_KEYS[key]!r}, which leaves it off, is accepted)')
                continue
            raise ConfigError(f'{source}: unknown key {key!r} (not a train.py flag; see train.py --help)')
        action = actions[key]
        if value is not None:
            try:
                value = _value(action, value)
            except (TypeError, ValueError):
                raise ConfigError(f'{source}: key {key!r} must be {_type_name(action)}, got {value!r}') from None
            if action.choices is not None and value not in action.choices:
                raise ConfigError(f'{source}: key {key!r} must be one of {list(action.choices)}, got {value!r}')
        defaults[key] = value
    return defaults


def yaml_problem(error: yaml.YAMLError) -> str:
    """What PyYAML found wrong, on one line, with the line and column where it found it."""
    problem = getattr(error, 'problem', None) or str(error).splitlines()[0]
    mark = getattr(error, 'problem_mark', None)
    return f'{problem} at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else problem


def load_config(path: str) -> Dict[str, Any]:
    """Read a YAML config file (ConfigError when missing, unreadable or not YAML)."""
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f'config file not found: {path}') from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise ConfigError(f'cannot read config file {path}: {e}') from None
    except yaml.YAMLError as e:
        raise ConfigError(f'config file {path} is not valid YAML: {yaml_problem(e)}') from None
    return cfg or {}


def parse_train_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse train.py's arguments: YAML config (if any) sets defaults, the command line overrides them.

    Returns the namespace and the args as YAML text (for `args.yaml`).
    """
    parser = build_train_parser()
    args_config, remaining = _parse_config_flag(argv)
    if args_config:
        parser.set_defaults(**check_config(load_config(args_config), parser, source=args_config))
    args = parser.parse_args(remaining)
    args.config = args_config
    if args.data and not args.data_dir:  # timm's deprecated positional DIR
        args.data_dir = args.data
    fold_router_args(args)
    return args, yaml.safe_dump(vars(args), default_flow_style=False)


def command_line_flags(argv: Optional[Sequence[str]] = None) -> Set[str]:
    """The flags (by dest, e.g. 'batch_size') that the command line `argv` (default: sys.argv[1:]) gives
    itself, not through a -c file or a default. The positional DIR counts as 'data_dir'."""
    _, remaining = _parse_config_flag(argv)
    parser = build_train_parser()
    for action in parser._actions:  # unset flags then stay out of the namespace
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(remaining)))
    return given | {'data_dir'} if 'data' in given else given


def _parse_config_flag(argv: Optional[Sequence[str]]) -> Tuple[str, List[str]]:
    pre = OneLineArgumentParser(add_help=False)
    pre.add_argument('-c', '--config', default='', type=str)
    ns, remaining = pre.parse_known_args(argv)
    return ns.config, remaining
