"""`python -m experiments {run,report,list,index}`: see the package docstring."""
import argparse
import dataclasses
import json
import sys
from typing import List, Optional

from timm_isomix.train.config import ConfigError, OneLineArgumentParser
from .report import markdown_table, summarize, write_report
from .runner import STUDIES, Scale, finished_runs, results_root, run_study
from . import studies  # noqa: F401  (registers the studies)


def _count(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a whole number of at least 1, got {text!r}')
    return value


def _optional_int(text: str):
    """A count, or 'all' (kept as the string so that it overrides the study's default; `_scale` maps it to None)."""
    if text == 'all':
        return text
    try:
        return _count(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number of images (at least 1) or 'all', got {text!r}") from None


def _scale(study, args) -> Scale:
    """The study's default Scale, or its `--preset`'s, with the flags' fields overridden."""
    scale = dataclasses.replace(study.base_scale(args.preset))
    for key in ('epochs', 'train_limit', 'val_limit', 'batch_size', 'width_mult'):
        value = getattr(args, key)
        if value is not None:
            setattr(scale, key, None if value == 'all' else value)
    return scale


def _study(name: str):
    if name not in STUDIES:
        raise ConfigError(f'unknown study {name!r}; studies: {", ".join(sorted(STUDIES))}')
    return STUDIES[name]


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; a wrong command, flag, value or name is one line on stderr and exit status 2."""
    try:
        return _main(argv)
    except ConfigError as e:
        print(f'experiments: error: {e}', file=sys.stderr)
        return 2


def _main(argv: Optional[List[str]]) -> int:
    p = OneLineArgumentParser(prog='python -m experiments', description=__doc__)
    sub = p.add_subparsers(dest='command', required=True)
    run = sub.add_parser('run', help='run the unfinished (configuration, seed) pairs of a study')
    run.add_argument('study')
    run.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    run.add_argument('--configs', nargs='+', default=None, help='a subset of the configurations (default: all)')
    run.add_argument('--jobs', type=_count, default=1, help='runs in parallel (subprocesses)')
    run.add_argument('--threads', type=_count, default=None, help='torch threads per run')
    run.add_argument('--epochs', type=_count, default=None)
    run.add_argument('--train-limit', type=_optional_int, default=None, help='training images, or "all"')
    run.add_argument('--val-limit', type=_optional_int, default=None, help='validation images, or "all"')
    run.add_argument('--batch-size', type=_count, default=None)
    run.add_argument('--width-mult', type=float, default=None)
    run.add_argument('--preset', default=None, help="a named scale of the study (e.g. 'full'); the flags above "
                     "override its fields")
    rep = sub.add_parser('report', help='write report.md and plots from the finished runs')
    rep.add_argument('study')
    rep.add_argument('--scale', default='cpu', help='scale name (the folder under the study; default cpu)')
    rep.add_argument('--json', action='store_true', help='print the per-configuration summary as JSON instead')
    rep.add_argument('--preset', default=None, help="the runs of a named scale (the same as --scale NAME)")
    sub.add_parser('list', help='each study, its configurations and finished seeds')
    index = sub.add_parser('index', help='write docs/results.md and the generated tables of README and docs')
    index.add_argument('--check', action='store_true', help='write nothing; exit 1 when a page is out of date')
    args = p.parse_args(argv)

    if args.command == 'index':
        from .index import main as index_main
        return index_main(['--check'] if args.check else [])

    if args.command == 'list':
        for name, study in sorted(STUDIES.items()):
            print(f'{name}: {study.description.splitlines()[0]}')
            scales = sorted(d.name for d in (results_root() / name).glob('*') if d.is_dir())
            for scale in scales or ['cpu']:
                done = finished_runs(name, scale)
                print(f'  [{scale}]')
                for config in study.configs:
                    print(f'    {config}: seeds {sorted(done.get(config, {})) or "none"}')
        return 0
    study = _study(args.study)
    if args.command == 'report':
        if args.preset is not None:
            if args.preset not in study.presets:
                print(f'experiments: error: study {study.name!r} has no preset {args.preset!r}; it has '
                      f'{sorted(study.presets) or "none"}', file=sys.stderr)
                return 2
            args.scale = args.preset
        if args.json:
            rows = summarize(study, args.scale)
            print(json.dumps([{'config': r['config'], 'top1_mean': r.get('top1_mean'), 'top1_std': r.get('top1_std'),
                               'n': r['n'], 'params': r.get('params')} for r in rows], indent=1))
            return 0
        try:
            paths = write_report(study, args.scale)
        except FileNotFoundError as e:
            print(f'experiments: error: {e}', file=sys.stderr)
            return 2
        print(markdown_table(study, summarize(study, args.scale)))
        print('\n'.join(f'{k}: {v}' for k, v in paths.items()))
        return 0
    try:
        failed = run_study(study, args.seeds, _scale(study, args), args.configs, args.jobs, args.threads,
                           preset=args.preset)
    except KeyError as e:
        print(f'experiments: error: {e.args[0]}', file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
