"""The plan of experiments/gpu.sh: which runs it makes, what they cost, and the data they need.

    python -m experiments.gpu_plan plan [--prepare] STAGE...   # the runs, their training FLOPs, estimated GPU time
    python -m experiments.gpu_plan prepare STAGE...            # decode the datasets the stages read, once
    python -m experiments.gpu_plan scales STAGE...             # each stage's study, scale name and kind
    python -m experiments.gpu_plan measure --json FILE         # training throughput of the full trunk here

A STAGE is `STUDY:PRESET:CONFIGS:SEEDS` (CONFIGS and SEEDS comma-separated, `*` for all the study's
configurations), optionally followed by flags as `experiments run` takes them after a `+`:
`reuse-cifar10:full:reuse1,reuse2:0,1,2+--epochs 1 --train-limit 64`.

The estimate is arithmetic, not a measurement: training FLOPs = 3 x the forward MACs x 2 (a backward costs
about twice the forward) per training image, plus one forward per validation image and epoch, summed over
the runs, divided by an assumed sustained throughput (`--tflops`, default 150: about 15 % of an H100's
dense bf16 peak, what small 32-pixel convolutional nets with 128 channels sustain in eager mode; see
docs/scale.md). FLOPs per image come from `count_macs` of each configuration's model at its scale.
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .runner import STUDIES, Scale, Study, merge_config
from . import studies  # noqa: F401  (registers the studies)

__all__ = ['Stage', 'parse_stage', 'stage_runs', 'run_flops', 'main']

DEFAULT_TFLOPS = 150.


@dataclasses.dataclass
class Stage:
    study: Study
    preset: str
    configs: List[str]
    seeds: List[int]
    flags: List[str]

    def scale(self) -> Scale:
        """The preset's Scale with the stage's flags applied (as `experiments run` applies them)."""
        from .__main__ import _optional_int
        scale = dataclasses.replace(self.study.base_scale(self.preset))
        it = iter(self.flags)
        for flag in it:
            key = flag.lstrip('-').replace('-', '_')
            if key in ('epochs', 'batch_size'):
                setattr(scale, key, int(next(it)))
            elif key in ('train_limit', 'val_limit'):
                value = _optional_int(next(it))
                setattr(scale, key, None if value == 'all' else value)
            elif key == 'width_mult':
                scale.width_mult = float(next(it))
            else:
                next(it, None)  # --jobs, --threads: how, not what, is run
        return scale


def parse_stage(text: str) -> Stage:
    """`STUDY:PRESET:CONFIGS:SEEDS[+FLAGS]` -> Stage (ValueError naming what is wrong)."""
    spec, _, flags = text.partition('+')
    parts = spec.split(':')
    if len(parts) != 4:
        raise ValueError(f'stage {text!r}: expected STUDY:PRESET:CONFIGS:SEEDS')
    name, preset, configs, seeds = parts
    if name not in STUDIES:
        raise ValueError(f'stage {text!r}: unknown study {name!r}')
    study = STUDIES[name]
    study.base_scale(preset)  # KeyError naming the presets the study has
    names = list(study.configs) if configs == '*' else configs.split(',')
    unknown = [c for c in names if c not in study.configs]
    if unknown:
        raise ValueError(f'stage {text!r}: study {name!r} has no configurations {unknown}')
    return Stage(study, preset, names, [int(s) for s in seeds.split(',')], flags.split())


def _count_images(data: str, split: str, classes) -> int:
    from timm_isomix.train.datasets import prepare_dataset
    root = prepare_dataset(data) / split
    folders = sorted(d for d in root.iterdir() if d.is_dir())
    if not isinstance(classes, int):
        folders = [d for d in folders if d.name in set(classes)]
    return sum(1 for d in folders for f in d.iterdir() if f.is_file())


def _limited(n: int, limit: Optional[int]) -> int:
    return n if limit is None else min(n, limit)


def _macs(model: str, kwargs: Dict[str, Any], scale: Scale, num_classes: int, img_size: int = 32) -> int:
    import timm
    from timm_isomix import models  # noqa: F401  (registers the isomix models)
    from timm_isomix.tools.summary import count_macs
    kwargs = dict(kwargs)
    if scale.width_mult != 1.0 and 'width' in kwargs:
        kwargs['width'] = int(round(kwargs['width'] * scale.width_mult))
    return count_macs(timm.create_model(model, num_classes=num_classes, **kwargs), (3, img_size, img_size))


def _classify_flops(config: Dict[str, Any], scale: Scale) -> float:
    n_train = _limited(_count_images(config['data'], 'train', 0), scale.train_limit)
    n_val = _limited(_count_images(config['data'], 'val', 0), scale.val_limit)
    macs = _macs(config['model'], config.get('model_kwargs') or {}, scale, 10, config.get('img_size', 32))
    images = (n_train // scale.batch_size) * scale.batch_size * scale.epochs
    return 2. * macs * (3 * images + n_val * scale.epochs)


def _task_sizes(tasks, split: str, scale: Scale) -> List[int]:
    key = 'train_limit' if split == 'train' else 'val_limit'
    return [_limited(_count_images(t['data'], split, t['classes']), t.get(key, getattr(scale, key))) for t in tasks]


def _joint_flops(config: Dict[str, Any], tasks, scale: Scale, epochs: int) -> float:
    """A multi-task model trained jointly (task_runs.train_model): every step one batch of every task."""
    train, val = _task_sizes(tasks, 'train', scale), _task_sizes(tasks, 'val', scale)
    b = scale.batch_size
    steps = max(1, round(sum(n // b if n > b else 1 for n in train) / len(train)))
    if config.get('steps_per_epoch'):
        steps = min(config['steps_per_epoch'], steps)
    macs = _macs(config['model'], config.get('model_kwargs') or {}, scale, 10)
    return 2. * macs * (3 * steps * b * len(tasks) + sum(val)) * epochs


def _transfer_flops(config: Dict[str, Any], scale: Scale) -> Tuple[float, float]:
    """(the bank's training, shared by the study's configurations of a seed; this configuration's transfer)."""
    from .studies.task_transfer import miniimagenet_tasks
    sources = config['sources'] if config['sources'] != 'miniimagenet' else miniimagenet_tasks()
    pretrain = config['pretrain']
    bank = _joint_flops(pretrain, sources, scale, pretrain['epochs'] * scale.epochs)
    held = config['held_out']
    n_train = _task_sizes([held], 'train', scale)[0]
    n_val = _task_sizes([held], 'val', scale)[0]
    macs = _macs(pretrain['model'], pretrain.get('model_kwargs') or {}, scale, 10)
    epochs = config['transfer_epochs'] * scale.epochs
    passes = 0 if config['mode'] == 'stats' else 3 if config['mode'] not in ('linear',) else 1
    return bank, 2. * macs * (passes * n_train + n_val) * epochs


def run_flops(study: Study, config_name: str, scale: Scale) -> Tuple[float, Optional[str], float]:
    """(this run's own training FLOPs, the key of a model it shares with other runs or None, that model's FLOPs)."""
    config = merge_config(study.configs[config_name], scale.overrides)
    kind = study.run.__name__
    if kind == 'train_classifier':
        return _classify_flops(config, scale), None, 0.
    if kind == 'run_multitask':
        return _joint_flops(config, config['tasks'], scale, scale.epochs), None, 0.
    if kind == 'run_transfer':
        bank, own = _transfer_flops(config, scale)
        return own, json.dumps(config['pretrain'], sort_keys=True), bank
    raise ValueError(f'study {study.name!r} ({kind}): gpu_plan has no cost model for it')


def stage_runs(stage: Stage) -> Dict[str, Any]:
    """The stage's runs and FLOPs: {'runs': n, 'flops': total, 'longest': the longest chain of one seed}."""
    scale = stage.scale()
    shared: Dict[Tuple[str, int], float] = {}
    total = longest = 0.
    for config in stage.configs:
        own, key, model = run_flops(stage.study, config, scale)
        for seed in stage.seeds:
            total += own
            if key is not None and (key, seed) not in shared:
                shared[(key, seed)] = model
                total += model
            longest = max(longest, own + (model if key is not None else 0.))
    return {'runs': len(stage.configs) * len(stage.seeds), 'flops': total, 'longest': longest,
            'scale': stage.study.scale_name(scale, stage.preset)}


def prepare(stages: Sequence[Stage]) -> None:
    """Decode every dataset split the stages read into the state folder's caches, once, before runs start in
    parallel (each run would otherwise decode it on its own, at the same time as the others)."""
    from .classify import task_tensors
    from .task_runs import task_data
    for stage in stages:
        scale = stage.scale()
        for name in stage.configs:
            config = merge_config(stage.study.configs[name], scale.overrides)
            if stage.study.run.__name__ == 'train_classifier':
                task_tensors(config['data'], config.get('img_size', 32), scale.train_limit, scale.val_limit)
                continue
            tasks = list(config.get('tasks') or [])
            if 'sources' in config:
                from .studies.task_transfer import miniimagenet_tasks
                tasks = (miniimagenet_tasks() if config['sources'] == 'miniimagenet' else config['sources'])
                tasks = [*tasks, config['held_out']]
            for t in tasks:
                for split, key in (('train', 'train_limit'), ('val', 'val_limit')):
                    task_data(t, split, 32, t.get(key, getattr(scale, key)))


def measure(steps: int = 5, warmup: int = 3, batch_size: int = 32) -> Dict[str, Any]:
    """Training steps of reuse-cifar10's full-size configurations on this machine's default device (AdamW,
    random batches): the median step, images/s and the FLOP rate by the same arithmetic as the plan."""
    import statistics
    import time
    import timm
    import torch
    from timm_isomix.tasks.fit import default_device
    from timm_isomix.tools.summary import count_macs
    study = STUDIES['reuse-cifar10']
    full, device, out = study.presets['full'], default_device(), {}
    for name in ('reuse2', 'unshared-depth8'):
        config = merge_config(study.configs[name], full.overrides)
        model = timm.create_model(config['model'], num_classes=10, **config['model_kwargs'])
        macs = count_macs(model, (3, 32, 32))
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x, y = torch.randn(batch_size, 3, 32, 32, device=device), torch.randint(0, 10, (batch_size,), device=device)
        times = []
        for _ in range(warmup + steps):
            began = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # waits for the device
            times.append(time.perf_counter() - began)
        step = statistics.median(times[warmup:])
        out[name] = {'macs': macs, 'step_s': step, 'images_per_s': batch_size / step,
                     'tflops': 6 * macs * batch_size / step / 1e12}
    import os
    return {'device': str(device), 'threads': torch.get_num_threads(), 'batch_size': batch_size,
            'load_average': os.getloadavg(), 'cases': out}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='python -m experiments.gpu_plan', description=__doc__.split('\n\n')[0])
    p.add_argument('command', choices=('plan', 'prepare', 'scales', 'measure'))
    p.add_argument('stages', nargs='*', metavar='STAGE')
    p.add_argument('--tflops', type=float, default=DEFAULT_TFLOPS, help='assumed sustained throughput (TFLOP/s)')
    p.add_argument('--json', default=None, help='also write the plan here')
    p.add_argument('--prepare', action='store_true', help='first decode every dataset the stages read (once)')
    args = p.parse_intermixed_args(argv)  # STAGEs after the options, too
    if args.command == 'measure':
        result = measure()
        for name, case in result['cases'].items():
            print(f'{name}: {case["step_s"]:.3f} s per step of {result["batch_size"]}, {case["images_per_s"]:.1f} '
                  f'images/s, {case["tflops"] * 1e3:.1f} GFLOP/s on {result["device"]} ({result["threads"]} threads)')
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1))
        return 0
    if not args.stages:
        p.error('plan, prepare and scales need at least one STAGE')
    try:
        stages = [parse_stage(s) for s in args.stages]
    except (KeyError, ValueError) as e:
        print(f'gpu_plan: error: {e.args[0]}', file=sys.stderr)
        return 2
    if args.command == 'scales':
        for stage in stages:
            kind = 'single' if stage.study.run.__name__ == 'train_classifier' else 'task'
            print(stage.study.name, stage.study.scale_name(stage.scale(), stage.preset), kind)
        return 0
    if args.prepare or args.command == 'prepare':
        prepare(stages)
        if args.command == 'prepare':
            return 0
    rows, total = [], 0.
    for stage in stages:
        row = stage_runs(stage)
        row.update(study=stage.study.name, configs=stage.configs, seeds=stage.seeds,
                   seconds=row['flops'] / (args.tflops * 1e12))
        rows.append(row)
        total += row['flops']
        print(f'  {stage.study.name} [{row["scale"]}]: {row["runs"]} runs ({", ".join(stage.configs)}; seeds '
              f'{",".join(map(str, stage.seeds))}): {row["flops"] / 1e15:.1f} PFLOP, '
              f'~{row["seconds"]:.0f} s at {args.tflops:g} TFLOP/s')
    print(f'  all studies: {total / 1e15:.1f} PFLOP, ~{total / (args.tflops * 1e12):.0f} s of GPU time at '
          f'{args.tflops:g} TFLOP/s (an estimate, not a measurement)')
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({'tflops': args.tflops, 'stages': rows,
                                               'seconds': total / (args.tflops * 1e12)}, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
