"""Control for the multi-task sharing pattern: every task twice.

The two copies of a task train on the same data as two tasks, each with its own random mixture start,
statistics, head and batches. They have nothing to specialise for, so the Jensen-Shannon divergence between
their mixtures measures how far mixtures drift apart from independent starts (`js_same_data`); the
divergence between different tasks (`js_cross_data`) minus that drift is what the tasks' data accounts for.
The paper's pattern (tasks share the first layers and specialise near the head) is the data's only if that
difference grows with depth.
  sharing-control-digits-cifar10  MNIST, USPS, MNIST-M and CIFAR-10 twice: multitask-digits-cifar10's trunk,
                                  recipe and 300 joint steps (different domains);
  sharing-control-min-mtl         the first 5 MIN-MTL tasks twice: routing-min-mtl's trunk, recipe and 4
                                  epochs (one domain, different classes).
"""
from typing import Any, Dict, List

from timm_isomix.train.plots import js_divergence
from ..runner import RunState, Scale, Study, register
from .multitask_learning import FULL as MULTITASK_FULL, STEPS, TASKS, TRUNK, run_multitask
from .routing_networks import min_mtl_tasks

__all__ = ['copies', 'run_sharing_control']


def copies(tasks: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each task, then its copy `<name>_b` (the same data and classes), both marked with the task they copy."""
    return [dict(t, name=t['name'] + suffix, copy_of=t['name']) for t in tasks for suffix in ('', '_b')]


def run_sharing_control(config: Dict[str, Any], seed: int, scale: Scale, state: RunState) -> Dict[str, Any]:
    """run_multitask, plus per-layer JS between copies of one task and between different tasks."""
    tasks = config['tasks']
    if isinstance(tasks, str):  # 'min-mtl:N': the first N MIN-MTL tasks, read from the dataset when run
        tasks = copies(min_mtl_tasks(int(tasks.split(':')[1])))
    result = run_multitask(dict(config, tasks=tasks), seed, scale, state)
    source = {t['name']: t['copy_of'] for t in tasks}
    alphas = result['task_alphas']
    names = list(alphas)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    for key, same in (('js_same_data', True), ('js_cross_data', False)):
        chosen = [js_divergence(alphas[a], alphas[b]) for a, b in pairs if (source[a] == source[b]) == same]
        result[key] = sum(chosen).div(len(chosen)).tolist()
    return result


register(Study(
    name='sharing-control-digits-cifar10',
    description='Control for the multi-task sharing pattern: isomix on MNIST, USPS, MNIST-M and CIFAR-10, each '
    'twice (8 tasks, each with its own mixture, statistics and head; the two copies draw their own batches), '
    'the multitask-digits-cifar10 recipe and steps per task. Per layer, the JS between copies of one dataset '
    '(drift from independent random starts) against the JS between different datasets (specialisation).',
    configs={'isomix': dict(TRUNK, tasks=copies(TASKS), steps_per_epoch=STEPS)},
    run=run_sharing_control,
    scale=Scale(epochs=1, train_limit=None, val_limit=None, batch_size=64),
    metrics=('top1', *(f'top1_{t["name"]}' for t in copies(TASKS))),
    presets={'full': MULTITASK_FULL},  # the multi-task study's full size
))

register(Study(
    name='sharing-control-min-mtl',
    description='Control for the multi-task sharing pattern on one domain: isomix on the first 5 MIN-MTL tasks '
    '(miniimagenet32, 5 classes each), each twice (10 tasks), routing-min-mtl\'s recipe and 4 epochs. Per layer, '
    'the JS between copies of one task (drift) against the JS between different tasks (specialisation).',
    configs={'isomix': dict(TRUNK, tasks='min-mtl:5')},
    run=run_sharing_control,
    scale=Scale(epochs=4, train_limit=None, val_limit=None, batch_size=64),
    metrics=('top1',),
    presets={'full': Scale(epochs=30, train_limit=None, val_limit=None, batch_size=128,
                           overrides=dict(model_kwargs=MULTITASK_FULL.overrides['model_kwargs']))},  # routing-min-mtl's
))
