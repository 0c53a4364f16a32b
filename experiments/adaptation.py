"""Unsupervised multi-source domain adaptation: MNIST + USPS (labelled) -> MNIST-M (unlabelled).

    python experiments/adaptation.py [--out output/experiments]

1. Trains a multi-task isomix on the sources MNIST and USPS with one shared head (one classifier,
   one mixture and statistics per domain).
2. Adds the target MNIST-M as a new task: the shared head, mixture logits = mean of the sources',
   statistics copied from MNIST. Only the target's mixture logits are then adapted on unlabelled
   MNIST-M images with the objective documented in timm_isomix/tasks/adaptation.py (entropy minimization with a
   diversity term, plus M3SDA moment matching of pooled features to each source), after re-estimating
   the target's BatchNorm statistics (AdaBN). Target labels are used only to report accuracy.
Writes adaptation-results.md/json and the mixture heatmap with the target.
"""
import argparse
import json
from pathlib import Path

import torch

from timm_isomix.tasks.adaptation import adapt_target
from timm_isomix.tasks.transfer import reestimate_stats
from timm_isomix.train.datasets import prepare_dataset
from timm_isomix.tasks.data import load_task_data
from timm_isomix.tasks.fit import evaluate
from timm_isomix.tasks.multitask import load_task_model, read_task_config, train_tasks
from timm_isomix.train.plots import js_sharing, plot_sharing, plot_task_mixtures

REPO = Path(__file__).resolve().parent.parent


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tasks', default=str(REPO / 'hparams' / 'multitask_digits.yaml'))
    p.add_argument('--sources', nargs='+', default=['mnist', 'usps'])
    p.add_argument('--target', default='mnistm')
    p.add_argument('--out', default='output/experiments')
    p.add_argument('--epochs', type=int, default=None, help='override the YAML')
    p.add_argument('--from-model', default=None,
                   help="a sources' model.pth from an earlier run of this script: skip source training")
    p.add_argument('--steps', type=int, default=300)
    p.add_argument('--adapt-lr', type=float, default=0.05)
    p.add_argument('--moment-weight', type=float, default=1.0)
    p.add_argument('--seed', type=int, default=42)
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads (1: best on a shared 2-core CPU)')
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = read_task_config(a.tasks).to_dict()
    if a.epochs is not None:
        cfg['epochs'] = a.epochs
    by_name = {t['name']: t for t in cfg['tasks']}
    cfg['tasks'] = [by_name[s] for s in a.sources]
    cfg['share_head'] = True
    if a.from_model:
        out_dir = Path(a.from_model).parent
        r = json.loads((out_dir / 'results.json').read_text())
    else:
        r = train_tasks({**cfg, 'output': a.out, 'experiment': 'adaptation-sources', 'seed': a.seed})
        out_dir = Path(r['out_dir'])
    model = load_task_model(out_dir / 'model.pth')
    tgt = by_name[a.target]
    root = prepare_dataset(tgt['data'])
    # Unlabelled target training images (labels are dropped) and a labelled target validation set for reporting.
    target_train = load_task_data(root, 'train', tgt['classes'], cfg['img_size'], cfg['train_limit'], a.seed, a.target).tensors[0]
    target_val = load_task_data(root, 'val', tgt['classes'], cfg['img_size'], cfg['val_limit'], a.seed, a.target)
    sources = {}
    for s in a.sources:
        t = by_name[s]
        sources[s] = load_task_data(prepare_dataset(t['data']), 'train', t['classes'], cfg['img_size'],
                                    cfg['train_limit'], a.seed, s).tensors[0]
    rows = {f'source-only ({s} path)': evaluate(model, s, target_val) for s in a.sources}
    model.add_task(a.target, tgt['classes'], init_from=a.sources[0], share_head_with=a.sources[0])
    with torch.no_grad():
        mean = torch.stack([model.tasks[s].schedules[0].mixture.logits for s in a.sources]).mean(0)
        model.tasks[a.target].schedules[0].mixture.logits.copy_(mean)
    rows['target, mean source mixture'] = evaluate(model, a.target, target_val)
    reestimate_stats(model, a.target, torch.utils.data.TensorDataset(target_train))
    rows['+ target statistics (AdaBN)'] = evaluate(model, a.target, target_val)
    before = {k: v.clone() for k, v in model.named_parameters()}
    torch.manual_seed(a.seed)
    hist = adapt_target(model, a.target, torch.utils.data.TensorDataset(target_train),
                        {s: torch.utils.data.TensorDataset(x) for s, x in sources.items()},
                        steps=a.steps, lr=a.adapt_lr, moment_weight=a.moment_weight, seed=a.seed, log_every=50)
    changed = sorted(k for k, v in model.named_parameters() if not torch.equal(v, before[k]))
    rows['+ adapted target mixture (objective)'] = evaluate(model, a.target, target_val)
    alphas = model.alphas()
    tag = f'-mw{a.moment_weight:g}' if a.from_model else ''  # re-runs on a saved model keep earlier results
    plot_task_mixtures(alphas, out_dir / f'adaptation-mixtures{tag}.png', title=f'{"+".join(a.sources)} -> {a.target}')
    plot_sharing(alphas, out_dir / f'adaptation-sharing{tag}.png')
    results = {'source_top1': r['top1'], 'target_top1': rows, 'changed_parameters': changed, 'history': hist,
               'js_per_layer': js_sharing(alphas).tolist(), 'out_dir': str(out_dir)}
    lines = [f'| {"+".join(a.sources)} -> {a.target} (unlabelled) | target top-1 |', '|---|---|']
    lines += [f'| {k} | {v:.1f} |' for k, v in rows.items()]
    lines.append(f'\nsource val top-1: {", ".join(f"{k} {v:.1f}" for k, v in r["top1"].items())}; '
                 f'parameters changed by adaptation: {changed}')
    table = '\n'.join(lines)
    print(json.dumps(hist))
    print(table)
    Path(a.out, f'adaptation-results{tag}.md').write_text(table + '\n')
    Path(a.out, f'adaptation-results{tag}.json').write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
    main()
