"""Two measurements of isomix_resnet50's training step against timm's resnet50, side by side in one process.

    python -m experiments.speed_gap --json experiments/results/speed-gap-cpu.json

The benchmark (`timm_isomix.tools.benchmark`) times a few consecutive steps of one model per repetition,
rotating the models' order, after asking glibc to keep freed memory (`--allocator retain`). A plain loop times
single steps of the models in turn with glibc's malloc as it is. This script runs both protocols on the same
models in the same process, once per allocator setting, each setting in fresh processes (`--launches` of
them, the settings alternating), so that what differs between the two measurements is named:

- `steps`: 3 warm-up steps per model, then `--rounds` rounds of one training step per model, the models'
  order reversed every other round; the median step;
- `benchmark`: the benchmark's own `interleaved_throughput` (2 warm-up steps, `--reps` repetitions of 2
  steps, the order rotating); the median repetition.

Per model, protocol and allocator: median step time, ratio to resnet50 (throughput, as the benchmark's
ratios), system time and page-faulted megabytes per step. Models: resnet50, isomix_resnet50 reuse 1 with
its soft mixture both ways `Schedule.recompute_rows` goes (rows mixed again in backward; rows kept from forward to
backward, its default, as many layers as templates per bank), and its hard order.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import torch

from timm_isomix.bank import Schedule
from timm_isomix.tools.bench_cases import make_cases
from timm_isomix.tools.benchmark import Runner, interleaved_throughput
from timm_isomix.tools.memory import retain_freed_memory

MODELS = ('resnet50', 'isomix_resnet50 reuse=1 soft, rows recomputed', 'isomix_resnet50 reuse=1 soft, rows kept',
          'isomix_resnet50 reuse=1 hard')
ROWS = {', rows recomputed': True, ', rows kept': False}  # Schedule.recompute_rows per model name's ending


def _runners(batch_size: int, img_size: int) -> List[Runner]:
    cases = {c.name: c for c in make_cases('resnet50')}
    args = SimpleNamespace(device='cpu', num_classes=1000, channels_last=False, batch_size=batch_size,
                           img_size=img_size, amp=False)
    runners = []
    for name in MODELS:
        ending = next((e for e in ROWS if name.endswith(e)), '')
        runner = Runner(cases[name[:len(name) - len(ending)]], args)
        for m in runner.model.modules():
            if isinstance(m, Schedule) and ending:
                m.recompute_rows = ROWS[ending]
        runners.append(runner)
    return runners


def _step(runner: Runner) -> List[float]:
    """One training step: seconds, system seconds, page-faulted MB."""
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    runner.train_step()
    elapsed, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return [elapsed, after.ru_stime - before.ru_stime,
            (after.ru_minflt - before.ru_minflt) * resource.getpagesize() / 2 ** 20]


def steps_protocol(runners: List[Runner], rounds: int) -> List[List[List[float]]]:
    for r in runners:
        r.model.train()
        for _ in range(3):
            r.train_step()
    out: List[List[List[float]]] = [[] for _ in runners]
    for k in range(rounds):
        order = range(len(runners)) if k % 2 == 0 else reversed(range(len(runners)))
        for i in order:
            out[i].append(_step(runners[i]))
    return out


def benchmark_protocol(runners: List[Runner], reps: int) -> List[List[List[float]]]:
    timed = interleaved_throughput(runners, True, SimpleNamespace(train_steps=2, reps=reps, warmup=2))
    batch = runners[0].x.shape[0]
    return [[[batch / img_s, sys_s, fault_mb] for img_s, sys_s, fault_mb in per] for per in timed]


def probe(allocator: str, launch: int, rounds: int, reps: int, batch_size: int, img_size: int) -> Dict:
    """One process: both protocols (their order alternating with the launch) on freshly built models."""
    retained = retain_freed_memory() if allocator == 'retain' else False
    runners = _runners(batch_size, img_size)
    protocols = [('steps', lambda: steps_protocol(runners, rounds)),
                 ('benchmark', lambda: benchmark_protocol(runners, reps))]
    if launch % 2:
        protocols.reverse()
    record = dict(allocator=allocator, retained=retained, launch=launch, order=[p for p, _ in protocols])
    for name, run in protocols:
        record[name] = {m: samples for m, samples in zip(MODELS, run())}
    return record


def summary(records: List[Dict]) -> List[Dict]:
    """Per allocator, protocol and model: medians over every launch's samples, ratios to resnet50."""
    rows = []
    for allocator in ('default', 'retain'):
        for protocol in ('steps', 'benchmark'):
            runs = [r[protocol] for r in records if r['allocator'] == allocator]
            if not runs:
                continue
            med = {m: [statistics.median(s[j] for run in runs for s in run[m]) for j in range(3)] for m in MODELS}
            per_launch = {m: [statistics.median(s[0] for s in run[m]) for run in runs] for m in MODELS}
            for m in MODELS:
                rows.append(dict(
                    allocator=allocator, protocol=protocol, model=m, step_s=med[m][0], system_s=med[m][1],
                    fault_mb=med[m][2], ratio=med['resnet50'][0] / med[m][0],
                    ratio_per_launch=[a / b for a, b in zip(per_launch['resnet50'], per_launch[m])]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='python -m experiments.speed_gap', description=__doc__.split('\n')[0])
    p.add_argument('--launches', type=int, default=2, help='fresh processes per allocator setting')
    p.add_argument('--rounds', type=int, default=8, help='steps protocol: timed steps per model')
    p.add_argument('--reps', type=int, default=4, help='benchmark protocol: repetitions of 2 steps per model')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--img-size', type=int, default=128)
    p.add_argument('--json', default=None, help='where to write the result file')
    p.add_argument('--probe', default=None, choices=('default', 'retain'), help=argparse.SUPPRESS)
    p.add_argument('--launch', type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ('launches', 'rounds', 'reps', 'batch_size', 'img_size'):
        if getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')
    sizes = dict(rounds=args.rounds, reps=args.reps, batch_size=args.batch_size, img_size=args.img_size)
    if args.probe:
        print(json.dumps(probe(args.probe, args.launch, **sizes)))
        return 0
    records = []
    for launch in range(args.launches):
        for allocator in (('default', 'retain') if launch % 2 == 0 else ('retain', 'default')):
            cmd = [sys.executable, '-m', 'experiments.speed_gap', '--probe', allocator, '--launch', str(launch),
                   *(f'--{k.replace("_", "-")}={v}' for k, v in sizes.items())]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            records.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f'launch {launch}, allocator {allocator}: done', flush=True)
    rows = summary(records)
    for r in rows:
        print(f"{r['allocator']:8s} {r['protocol']:10s} {r['model']:42s} step {r['step_s']:.3f} s  "
              f"ratio {r['ratio']:.3f}  sys {r['system_s']:.3f} s  faults {r['fault_mb']:.0f} MB")
    if args.json:
        command = 'python -m experiments.speed_gap ' + ' '.join(argv if argv is not None else sys.argv[1:])
        result = dict(command=command.strip(), torch=torch.__version__, threads=torch.get_num_threads(),
                      sizes=sizes, summary=rows, records=records)
        Path(args.json).write_text(json.dumps(result, indent=1) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
