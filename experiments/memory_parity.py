"""Peak training memory of soft schedules against the networks they stand for, outside the benchmark.

    python -m experiments.memory_parity --json experiments/results/memory-parity-cpu.json

Each measurement is a fresh process: build the model, an SGD optimizer with momentum and one batch, then
the peak resident set (reset first) over two training steps minus the resident set before them, every large
block a mapping of its own that is returned when freed (`timm_isomix.tools.memory.map_every_block`, as the
benchmark's memory probes), so that the peak is the live tensors' and repeats from launch to launch. Pairs: isomix_iso_256_16_p14
soft against the same schedule as a hard order; isomix_resnet50 reuse 1, soft and hard, against timm's
resnet50; each soft schedule also the other way `Schedule.recompute_rows` can go where its default does not
(the isometric trunk, 16 layers over 8 templates, mixes its rows again in backward by default: here also with them
kept from forward to backward; isomix_resnet50 reuse 1, as many layers as templates per bank, keeps them: here also
mixed again). `--launches` processes per model, the models' order rotating.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

import timm
from timm_isomix.bank import Schedule, cyclic_order
from timm_isomix.tools.memory import current_rss_kib, map_every_block, peak_rss_kib, reset_peak_rss

MODELS = {  # name: (timm model, kwargs, hard order, Schedule.recompute_rows: None is the default rule)
    'isomix_iso_256_16_p14 soft': ('isomix_iso_256_16_p14', {}, False, None),
    'isomix_iso_256_16_p14 soft, rows kept': ('isomix_iso_256_16_p14', {}, False, False),
    'isomix_iso_256_16_p14 hard': ('isomix_iso_256_16_p14', {}, True, None),
    'resnet50': ('resnet50', {}, False, None),
    'isomix_resnet50 reuse=1 soft': ('isomix_resnet50', dict(reuse=1), False, None),
    'isomix_resnet50 reuse=1 soft, rows recomputed': ('isomix_resnet50', dict(reuse=1), False, True),
    'isomix_resnet50 reuse=1 hard': ('isomix_resnet50', dict(reuse=1), True, None),
}
PAIRS = [('isomix_iso_256_16_p14 soft', 'isomix_iso_256_16_p14 hard'),
         ('isomix_iso_256_16_p14 soft, rows kept', 'isomix_iso_256_16_p14 hard'),
         ('isomix_resnet50 reuse=1 soft', 'resnet50'), ('isomix_resnet50 reuse=1 hard', 'resnet50'),
         ('isomix_resnet50 reuse=1 soft, rows recomputed', 'resnet50')]
LIMIT = 1.05


def measure(name: str, batch_size: int, img_size: int) -> float:
    """Peak memory growth (MB) of two training steps of one model, in this process."""
    if not map_every_block():
        raise RuntimeError('this system has no glibc mallopt to fix the mmap threshold with')
    arch, kwargs, hard, recompute = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=1000, **kwargs)
    if hard:
        model.set_schedule(order=[cyclic_order(m.num_layers, m.num_templates) for m in model.mixtures().values()])
    for m in model.modules():
        if isinstance(m, Schedule):
            m.recompute_rows = recompute
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch_size, 3, img_size, img_size), torch.randint(0, 1000, (batch_size,))
    base = current_rss_kib()
    if not reset_peak_rss():
        raise RuntimeError('this system cannot reset the peak resident set (/proc/self/clear_refs)')
    for _ in range(2):  # the first step also creates the gradients and the optimizer's state
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (peak_rss_kib() - base) / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='python -m experiments.memory_parity', description=__doc__.split('\n')[0])
    p.add_argument('--launches', type=int, default=3, help='fresh processes per model')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--img-size', type=int, default=128)
    p.add_argument('--json', default=None, help='where to write the result file')
    p.add_argument('--probe', default=None, choices=sorted(MODELS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ('launches', 'batch_size', 'img_size'):
        if getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')
    if args.probe:
        print(json.dumps(dict(peak_mb=measure(args.probe, args.batch_size, args.img_size))))
        return 0
    names = list(MODELS)
    peaks: Dict[str, List[float]] = {n: [] for n in names}
    for launch in range(args.launches):
        for name in names[launch % len(names):] + names[:launch % len(names)]:
            cmd = [sys.executable, '-m', 'experiments.memory_parity', '--probe', name,
                   f'--batch-size={args.batch_size}', f'--img-size={args.img_size}']
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            peaks[name].append(json.loads(out.stdout.strip().splitlines()[-1])['peak_mb'])
        print(f'launch {launch}: ' + ', '.join(f'{n} {peaks[n][-1]:.0f} MB' for n in names), flush=True)
    median = {n: statistics.median(v) for n, v in peaks.items()}
    ratios = [dict(model=a, reference=b, ratio=median[a] / median[b], limit=LIMIT,
                   within=median[a] / median[b] <= LIMIT) for a, b in PAIRS]
    for r in ratios:
        print(f"{r['model']} / {r['reference']}: {r['ratio']:.3f} ({'<=' if r['within'] else '>'} {LIMIT})")
    if args.json:
        command = 'python -m experiments.memory_parity ' + ' '.join(argv if argv is not None else sys.argv[1:])
        Path(args.json).write_text(json.dumps(dict(
            command=command.strip(), torch=torch.__version__, timm=timm.__version__, batch_size=args.batch_size,
            img_size=args.img_size, peak_mb=peaks, median_mb=median, ratios=ratios), indent=1) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
