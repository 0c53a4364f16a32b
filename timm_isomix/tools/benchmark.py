"""Speed of isomix models side by side with their references: `python -m timm_isomix.tools.benchmark`.

Every case is a model paired with a reference of the same FLOPs (or, for `reuse=2`, a known FLOP
ratio). All models live in one process and are timed interleaved (the case order rotates every
repetition), after warm-up, so that load from other processes hits every case alike; the figures are
medians over repetitions and the ratios are isomix / reference.

Measured per case:
  - training step throughput (forward, backward, optimizer step), images/s;
  - inference throughput (eval mode, no grad), images/s;
  - per step, the process's system time and page-faulted memory (getrusage): the kernel's share;
  - peak memory of training: on CPU the peak resident set (VmHWM, reset first) during two training
    steps minus the resident set before them (model, optimizer and batch built), each case in its own
    subprocess so that no case sees another's peak, with every large block mapped on its own
    (`map_every_block`) so that the peak is the live tensors'; on a GPU torch.cuda.max_memory_allocated;
  - the share of a profiled training step spent mixing templates (the mixtures' forward plus the
    backward nodes they create), from torch.profiler;
  - FLOPs of one training step per image (torch.utils.flop_counter, forward and backward);
  - optionally the same throughputs under torch.compile.

The reuse=2 case is also compared with timm's own ResNet of the same depth (the same blocks per stage
as its schedule runs, hence the same FLOPs), which tells the cost of mixing from the cost of depth.

On CPU the process first asks glibc's malloc to keep freed memory (`--allocator retain`, the default;
see `retain_freed_memory`), as PyTorch's CUDA caching allocator does on a GPU: otherwise every block
above glibc's mmap threshold (at most 32 MB) is unmapped on free and page-faulted back, zeroed by
the kernel, on the next step, and that system time, not the models' work, dominates the ratios.

Defaults fit a 2-core CPU (batch 32 at 128 px); on a GPU: bf16 autocast, channels_last, batch 256
at 224 px. It prints a table and writes JSON.
"""
import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import timm
from timm.optim import create_optimizer_v2

from ..bank import Mixture
from ..blocks import MIX_LABEL
from .bench_cases import Case, build_model, make_cases, plain_isometric, same_depth_resnet
from .memory import current_rss_kib, map_every_block, peak_rss_kib, reset_peak_rss, retain_freed_memory

__all__ = ['Case', 'make_cases', 'plain_isometric', 'same_depth_resnet', 'retain_freed_memory', 'run_benchmark', 'main']

# Autograd nodes that only the mixing creates: softmax(logits / temperature), alpha @ rows, the split
# of the rows into per-layer views, and in training the rows' batched gradient (blocks.run_mixed).
# Neither timm's ResNet nor the plain reference has any of them (their classifiers backprop through
# addmm), which the benchmark reports as a check.
MIX_BACKWARD_NODES = ('MmBackward0', 'SoftmaxBackward0', 'DivBackward0', 'SplitWithSizesBackward0',
                      'UnbindBackward0', 'StackBackward0', 'CatBackward0', '_BankGradientBackward')
MIX_FORWARD_LABEL = 'isomix::mixture_forward'


class Runner:
    """A case's model, optimizer and batch, with a training step and an inference step."""

    def __init__(self, case: Case, args: argparse.Namespace, compiled: bool = False):
        self.case, self.device = case, torch.device(args.device)
        torch.manual_seed(0)
        self.model = build_model(case, args.num_classes).to(self.device)
        mem = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=mem)
        self.optimizer = create_optimizer_v2(self.model, 'sgd', lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=self.device)
        self.x = self.x.contiguous(memory_format=mem)
        self.y = torch.randint(0, args.num_classes, (args.batch_size,), device=self.device)
        self.amp = args.amp
        self.compiled = compiled
        self.net = torch.compile(self.model) if compiled else self.model

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_step(self) -> None:
        with self.autocast():
            loss = F.cross_entropy(self.net(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer_step(self) -> None:
        with self.autocast():
            self.net(self.x)

    def sync(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)


def _timed(runner: Runner, fn: Callable[[], None], steps: int) -> Tuple[float, float, float]:
    """Images per second over `steps` calls of fn, and per call the process's system time (s) and
    page-faulted memory (MB): the kernel's share, which the allocator setting decides."""
    runner.sync()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        fn()
    runner.sync()
    elapsed, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    page_mb = resource.getpagesize() / 2 ** 20
    return (steps * runner.x.shape[0] / elapsed, (after.ru_stime - before.ru_stime) / steps,
            (after.ru_minflt - before.ru_minflt) * page_mb / steps)


def interleaved_throughput(
        runners: Sequence[Runner], train: bool, args: argparse.Namespace) -> List[List[Tuple[float, float, float]]]:
    """_timed() of every runner in every repetition; the case order rotates each repetition."""
    for r in runners:
        r.model.train(train)
    fns = [r.train_step if train else r.infer_step for r in runners]
    steps = args.train_steps if train else args.infer_steps
    for r, fn in zip(runners, fns):
        # compiled models compile on their first calls; more warm-up lets lazily built kernels settle
        for _ in range(args.warmup + (args.compile_warmup if r.compiled else 0)):
            fn()
        r.sync()
    results: List[List[Tuple[float, float, float]]] = [[] for _ in runners]
    for rep in range(args.reps):
        for j in range(len(runners)):
            i = (j + rep) % len(runners)
            results[i].append(_timed(runners[i], fns[i], steps))
    return results


def train_flops_per_image(runner: Runner) -> float:
    """FLOPs of one training step's forward and backward, per image (mixing included)."""
    runner.model.train()
    with FlopCounterMode(display=False) as counter:
        with runner.autocast():
            loss = F.cross_entropy(runner.model(runner.x), runner.y)
        loss.backward()
    runner.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / runner.x.shape[0]


def mixing_share(runner: Runner) -> float:
    """Share of one profiled training step spent mixing templates: the mixtures' forward calls, each
    row mixed and mixed again in backward by run_mixed (MIX_LABEL), and the backward nodes that only
    mixing creates (MIX_BACKWARD_NODES)."""
    runner.model.train()
    ranges: List[Any] = []
    hooks = []
    for m in runner.model.modules():
        if isinstance(m, Mixture):
            def pre(module, inputs):
                ranges.append(torch.profiler.record_function(MIX_FORWARD_LABEL).__enter__())

            def post(module, inputs, output):
                ranges.pop().__exit__(None, None, None)
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        runner.train_step()  # warm
        runner.sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            runner.train_step()
            runner.sync()
            total = time.perf_counter() - start
    finally:
        for h in hooks:
            h.remove()
    mixing_us = 0.
    for event in prof.key_averages():
        node = event.key.rsplit(': ', 1)[-1]
        if event.key in (MIX_FORWARD_LABEL, MIX_LABEL) or (
                event.key.startswith('autograd::engine::evaluate_function') and node in MIX_BACKWARD_NODES):
            mixing_us += event.cpu_time_total
    return mixing_us / 1e6 / total


def _peak_memory_mb_here(case: Case, args: argparse.Namespace) -> float:
    runner = Runner(case, args)
    runner.model.train()
    if runner.device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(runner.device)
        base = torch.cuda.memory_allocated(runner.device)
        for _ in range(2):
            runner.train_step()
        return (torch.cuda.max_memory_allocated(runner.device) - base) / 2 ** 20
    base = current_rss_kib()
    hwm = reset_peak_rss()
    for _ in range(2):  # the first step also creates gradients and optimizer state
        runner.train_step()
    peak = peak_rss_kib() if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return (peak - base) / 1024


def peak_memory_mb(case: Case, args: argparse.Namespace, argv: Sequence[str]) -> Optional[float]:
    """Peak training memory of one case, measured in a fresh subprocess (the peak RSS is per process)."""
    cmd = [sys.executable, '-m', 'timm_isomix.tools.benchmark', *argv, '--memory-probe', case.name]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f'memory probe for {case.name!r} failed:\n{out.stderr[-2000:]}', file=sys.stderr)
        return None
    return float(json.loads(out.stdout.strip().splitlines()[-1])['peak_memory_mb'])


def _median(xs: Sequence[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _load() -> Dict[str, Any]:
    try:
        uptime = subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
    except OSError:
        uptime = None
    return dict(loadavg=list(os.getloadavg()), uptime=uptime)


def _machine(device: torch.device) -> Dict[str, Any]:
    info = dict(
        platform=platform.platform(), processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), python=platform.python_version(),
        torch=torch.__version__, timm=timm.__version__)
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def targets(results: Dict[str, Dict[str, Any]], cases: Sequence[Case], on_gpu: bool) -> List[Dict[str, Any]]:
    """The issue's targets, checked on this run's ratios."""
    out = []

    def add(name, value, threshold, at_most=False):
        met = None if value is None else value <= threshold if at_most else value >= threshold
        out.append(dict(target=name, value=value, threshold=threshold, met=met, at_most=at_most))

    def memory(c: Case, other: Optional[str]):
        # training memory at parity: at most 1.05x the network it stands for (a hard order, timm's ResNet)
        if other is not None and c.name in results and 'peak_memory_mb' in results[c.name]:
            add(f'train memory {c.name} / {other}',
                _ratio(results[c.name]['peak_memory_mb'], results[other].get('peak_memory_mb')), 1.05, at_most=True)
    hard_iso = {c.model: c.name for c in cases if c.role == 'iso_hard'}
    for c in cases:
        r = results[c.name]
        if c.role == 'soft1':
            add(f'inference {c.name} / {c.reference}', r['infer_ratio'], 0.98)
            add(f'train step {c.name} / {c.reference}', r['train_ratio'], 0.97 if on_gpu else 0.95)
            memory(c, c.reference)
        elif c.role == 'hard1':
            add(f'train step {c.name} / {c.reference}', r['train_ratio'], 0.98)
            memory(c, c.reference)
        elif c.role == 'iso':
            memory(c, hard_iso.get(c.model))
        elif c.role == 'reuse2':
            # step time <= 1.05 * flop ratio * reference step time  <=>  throughput ratio >= 1 / (1.05 * flop ratio)
            flop_ratio = _ratio(r['train_flops_per_image'], results[c.reference]['train_flops_per_image'])
            peer = ', '.join(f'{m} {r[m + "_ratio_peer"]:.3f}' for m in ('train', 'infer') if r.get(m + '_ratio_peer'))
            peer = f'; / {c.peer}: {peer}' if peer else ''
            add(f'train step {c.name} / {c.reference} (FLOP ratio {flop_ratio:.3f}{peer})', r['train_ratio'],
                round(1 / (1.05 * flop_ratio), 4))
        for mode in ('train', 'infer'):
            compiled = r.get(f'compiled_{mode}_img_s')
            if compiled is not None:
                add(f'torch.compile / eager, {mode}, {c.name}', _ratio(compiled, r[f'{mode}_img_s']), 1.0)
    return out


def run_benchmark(args: argparse.Namespace, argv: Sequence[str] = ()) -> Dict[str, Any]:
    """Run every case of the suite and return the report (also printed and, with --json, written)."""
    device = torch.device(args.device)
    cases = make_cases(args.suite)
    load_before = _load()
    results: Dict[str, Dict[str, Any]] = {c.name: dict(model=c.model, kwargs=c.kwargs, hard=c.hard,
                                                       reference=c.reference) for c in cases}
    runners = [Runner(c, args) for c in cases]
    for c, r in zip(cases, runners):
        results[c.name]['params_m'] = sum(p.numel() for p in r.model.parameters()) / 1e6
        results[c.name]['train_flops_per_image'] = train_flops_per_image(r)
    # compiled models are timed in the same interleaved loop as the eager ones, so that
    # compiled / eager compares repetitions run under the same load
    main_names = {n for c in cases if c.role == 'soft1' for n in (c.name, c.reference)}
    compiled = [c for c in cases if args.compile == 'all' or (args.compile == 'main' and c.name in main_names)]
    timed = [(c, '') for c in cases] + [(c, 'compiled_') for c in compiled]
    all_runners = runners + [Runner(c, args, compiled=True) for c in compiled]

    for mode in args.modes:
        print(f'timing {mode} ({args.reps} interleaved repetitions; {len(compiled)} compiled)...', file=sys.stderr)
        for (c, prefix), runs in zip(timed, interleaved_throughput(all_runners, mode == 'train', args)):
            img_s, system_s, fault_mb = zip(*runs)
            out, key = results[c.name], prefix + mode
            out[f'{key}_img_s_runs'], out[f'{key}_img_s'] = list(img_s), _median(img_s)
            out[f'{key}_system_s_per_step'], out[f'{key}_page_fault_mb_per_step'] = _median(system_s), _median(fault_mb)
    del all_runners

    if args.profile:
        print('profiling the mixing share...', file=sys.stderr)
        for c, r in zip(cases, runners):
            results[c.name]['mix_share'] = mixing_share(r)
    del runners

    if args.memory:
        print('measuring peak memory (one subprocess per case)...', file=sys.stderr)
        for c in cases:
            results[c.name]['peak_memory_mb'] = peak_memory_mb(c, args, argv)

    for c in cases:
        r, ref = results[c.name], results.get(c.reference) if c.reference else None
        for key in ('train', 'infer', 'compiled_train', 'compiled_infer', 'peak_memory'):
            unit = '_mb' if key == 'peak_memory' else '_img_s'
            if ref is not None:
                r[f'{key}_ratio'] = _ratio(r.get(key + unit), ref.get(key + unit))
        peer = results.get(c.peer) if c.peer else None
        for mode in ('train', 'infer') if peer is not None else ():
            r[f'{mode}_ratio_peer'] = _ratio(r.get(f'{mode}_img_s'), peer.get(f'{mode}_img_s'))
        if ref is not None:
            # paired: ratio within each repetition, then the median (robust to load drifting between repetitions)
            for mode in args.modes:
                r[f'{mode}_ratio_paired'] = _median(
                    [a / b for a, b in zip(r[f'{mode}_img_s_runs'], ref[f'{mode}_img_s_runs'])])

    report = dict(
        machine=_machine(device), load_before=load_before, load_after=_load(),
        settings=dict(suite=args.suite, device=args.device, batch_size=args.batch_size, img_size=args.img_size,
                      amp_bf16=args.amp, channels_last=args.channels_last, reps=args.reps, warmup=args.warmup,
                      modes=args.modes, train_steps=args.train_steps, infer_steps=args.infer_steps,
                      compile=args.compile, compile_warmup=args.compile_warmup, allocator=args.allocator_in_effect,
                      memory_method='cuda max_memory_allocated' if device.type == 'cuda' else
                      'peak RSS (VmHWM, reset first) over two training steps minus RSS before them, '
                      'one subprocess per case'),
        command='python -m timm_isomix.tools.benchmark ' + ' '.join(argv),
        cases=results,
        targets=targets(results, cases, device.type == 'cuda'),
    )
    return report


def format_table(report: Dict[str, Any]) -> str:
    """The report as a text table (ratios are isomix / reference)."""
    def f(v, fmt):
        return '-' if v is None else format(v, fmt)
    cols = ['case', 'GFLOP/img', 'train img/s', 'ratio', 'sys s/step', 'infer img/s', 'ratio', 'mix share',
            'peak MB', 'ratio', 'compiled train', 'compiled infer']
    rows = []
    for name, r in report['cases'].items():
        rows.append([
            name, f(r['train_flops_per_image'] / 1e9, '.2f'), f(r.get('train_img_s'), '.1f'),
            f(r.get('train_ratio'), '.3f'), f(r.get('train_system_s_per_step'), '.2f'),
            f(r.get('infer_img_s'), '.1f'), f(r.get('infer_ratio'), '.3f'),
            f(r.get('mix_share'), '.1%'), f(r.get('peak_memory_mb'), '.0f'), f(r.get('peak_memory_ratio'), '.3f'),
            f(r.get('compiled_train_img_s'), '.1f'), f(r.get('compiled_infer_img_s'), '.1f')])
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    lines = [' | '.join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [cols] + rows]
    lines.insert(1, '-+-'.join('-' * w for w in widths))
    lines.append('')
    for t in report['targets']:
        mark = {True: 'met', False: 'MISSED', None: 'n/a'}[t['met']]
        lines.append(f"{mark:6s} {t['target']}: {f(t['value'], '.3f')} ({'<=' if t.get('at_most') else '>='} "
                     f"{t['threshold']})")
    s = report['settings']
    lines.append(f"batch {s['batch_size']} x {s['img_size']} px on {s['device']}, {s['reps']} repetitions, "
                 f"allocator {s['allocator']}; "
                 f"load before {report['load_before']['loadavg']}, after {report['load_after']['loadavg']}")
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog='python -m timm_isomix.tools.benchmark', description=__doc__.split('\n')[0])
    p.add_argument('--suite', default='resnet50', choices=('resnet50', 'tiny'),
                   help="'resnet50': the cases README reports; 'tiny': small models (a quick check)")
    p.add_argument('--device', default='cuda' if on_gpu else 'cpu')
    p.add_argument('--batch-size', type=int, default=None, help='default: 256 on a GPU, 32 on CPU')
    p.add_argument('--img-size', type=int, default=None, help='default: 224 on a GPU, 128 on CPU')
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None, help='bf16 autocast (default on GPU)')
    p.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                   help='channels_last memory format (default on GPU)')
    p.add_argument('--modes', nargs='+', default=['train', 'infer'], choices=('train', 'infer'),
                   help='what to time: training steps, inference, or both (default)')
    p.add_argument('--reps', type=int, default=5, help='timed repetitions per case (medians are reported)')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per case before timing')
    p.add_argument('--train-steps', type=int, default=2, help='training steps per timed repetition')
    p.add_argument('--infer-steps', type=int, default=3, help='inference batches per timed repetition')
    p.add_argument('--compile', default='main', choices=('none', 'main', 'all'),
                   help="torch.compile: none, 'main' (reuse=1 soft and its reference; compiling takes minutes "
                        "on CPU) or all")
    p.add_argument('--compile-warmup', type=int, default=3, help='extra warm-up steps for compiled models')
    p.add_argument('--profile', action=argparse.BooleanOptionalAction, default=True, help='measure the mixing share')
    p.add_argument('--memory', action=argparse.BooleanOptionalAction, default=True, help='measure peak memory')
    p.add_argument('--allocator', default='retain', choices=('retain', 'default'),
                   help="CPU memory: 'retain' keeps freed memory in the process (glibc mallopt, as the CUDA "
                        "caching allocator does on a GPU); 'default' leaves glibc's malloc as it is")
    p.add_argument('--json', default='benchmark.json', help='where to write the JSON report')
    p.add_argument('--memory-probe', default=None, help=argparse.SUPPRESS)  # internal: one case's peak memory
    args = p.parse_args(argv)
    gpu = args.device.startswith('cuda')
    if gpu and not torch.cuda.is_available():
        p.error(f'--device {args.device} asked for, but torch sees no CUDA device')
    args.batch_size = (256 if gpu else 32) if args.batch_size is None else args.batch_size
    args.img_size = (224 if gpu else 128) if args.img_size is None else args.img_size
    args.amp = gpu if args.amp is None else args.amp
    args.channels_last = gpu if args.channels_last is None else args.channels_last
    args.allocator_in_effect = 'default'  # main() records 'retain' once mallopt has taken it
    for name in ('batch_size', 'img_size', 'reps', 'train_steps', 'infer_steps'):
        if getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')
    if args.warmup < 0 or args.compile_warmup < 0:
        p.error(f'--warmup and --compile-warmup must be >= 0, got {args.warmup} and {args.compile_warmup}')
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.memory_probe is not None:  # its own process: the peak of the live tensors (map_every_block)
        map_every_block()
        case = {c.name: c for c in make_cases(args.suite)}[args.memory_probe]
        print(json.dumps(dict(case=case.name, peak_memory_mb=_peak_memory_mb_here(case, args))))
        return {}
    if args.allocator == 'retain':
        if retain_freed_memory():
            args.allocator_in_effect = 'retain (glibc mallopt: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)'
        else:
            print('--allocator retain: no glibc mallopt here; timing with the default allocator', file=sys.stderr)
    report = run_benchmark(args, argv)
    print(format_table(report))
    with open(args.json, 'w') as fh:
        json.dump(report, fh, indent=2)
    print(f'wrote {args.json}', file=sys.stderr)
    return report


if __name__ == '__main__':
    main()
