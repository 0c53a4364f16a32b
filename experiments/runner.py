"""Studies, their result files, and running them (resumable, optionally several runs in parallel)."""
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from timm_isomix.train.files import atomic_save, atomic_write_bytes

__all__ = ['Scale', 'Study', 'RunState', 'STUDIES', 'register', 'results_root', 'result_path', 'merge_config',
           'run_one', 'run_study', 'finished_runs']

REPO_ROOT = Path(__file__).resolve().parent.parent


def results_root() -> Path:
    """Where result files go: `$ISOMIX_RESULTS`, else `experiments/results` in the checkout."""
    return Path(os.environ.get('ISOMIX_RESULTS') or REPO_ROOT / 'experiments' / 'results')


def state_root() -> Path:
    """Where interrupted runs keep their state: `$ISOMIX_STATE`, else `output/experiments` (git-ignored)."""
    return Path(os.environ.get('ISOMIX_STATE') or REPO_ROOT / 'output' / 'experiments')


@dataclass
class Scale:
    """How big a run is. The study's own Scale is its CPU default, its presets the named larger ones (e.g.
    'full'); flags override fields of either."""
    epochs: int = 5
    train_limit: Optional[int] = None   # training images (seeded subset, the same for every seed); None: all
    val_limit: Optional[int] = None
    batch_size: int = 64
    width_mult: float = 1.0             # multiplies the model's width (model_kwargs['width'])
    # A preset's changes to every configuration (a wider trunk, its recipe), merged key by key into nested
    # dicts (merge_config); no flag sets them, so a CPU-default scale has none.
    overrides: Dict[str, Any] = field(default_factory=dict)

    def name(self, default: 'Scale', preset: Optional[str] = None) -> str:
        """The folder of runs at this scale: 'cpu' for the study's default scale, else the overridden fields
        (e.g. 'epochs30-train_limitall'); `preset` (with `default` that preset's Scale): its name, followed by
        the fields overridden on top of it (e.g. 'full', 'full-epochs1-train_limit256')."""
        diff = [f'{k}{"all" if v is None else v}' for k, v in dataclasses.asdict(self).items()
                if k != 'overrides' and v != getattr(default, k)]
        if preset is None:
            return 'cpu' if not diff else '-'.join(diff)
        return '-'.join([preset, *diff])

    def flags(self) -> List[str]:
        """The command-line flags that set every field a flag can set (`overrides` come with a preset)."""
        out = []
        for k, v in dataclasses.asdict(self).items():
            if k != 'overrides':
                out += [f'--{k.replace("_", "-")}', 'all' if v is None else str(v)]
        return out


def merge_config(config: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """`config` with `overrides` applied: a dict value merges into the config's dict of that key, key by key
    (so {'model_kwargs': {'width': 128}} keeps the other model arguments); anything else replaces."""
    out = dict(config)
    for k, v in overrides.items():
        out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class Study:
    name: str
    description: str
    configs: Dict[str, Dict[str, Any]]
    run: Callable[..., Dict[str, Any]]   # (config, seed, scale, state) -> result with 'top1' and 'params'
    scale: Scale = field(default_factory=Scale)
    metrics: Sequence[str] = ('top1',)   # result keys the report tabulates (mean +- std)
    # Named scales beside the CPU default (`--preset NAME`), each stored under its own name: 'full' is the
    # size the literature trains such models at (full training sets, its epochs, GPU batch sizes).
    presets: Dict[str, Scale] = field(default_factory=dict)
    # seeds per configuration that finish a scale: 1 for a selection study, whose runs choose hyperparameters
    # for another study and report nothing themselves
    min_seeds: int = 3

    def base_scale(self, preset: Optional[str] = None) -> Scale:
        """The study's default Scale, or that of one of its presets (KeyError naming the presets it has)."""
        if preset is None:
            return self.scale
        if preset not in self.presets:
            raise KeyError(f'study {self.name!r} has no preset {preset!r}; it has {sorted(self.presets) or "none"}')
        return self.presets[preset]

    def scale_name(self, scale: Scale, preset: Optional[str] = None) -> str:
        return scale.name(self.base_scale(preset), preset)


STUDIES: Dict[str, Study] = {}


def register(study: Study) -> Study:
    bad = [c for c in study.configs if not c or '/' in c or c.startswith('.')]
    if bad:
        raise ValueError(f'study {study.name!r}: configuration names {bad} cannot be folder names')
    # a preset's name starts its scale folders, so it must not read as the CPU default or as a field override
    fields = [f.name for f in dataclasses.fields(Scale)]
    bad = [p for p in study.presets if not p.isalnum() or p == 'cpu' or any(p.startswith(f) for f in fields)]
    if bad:
        raise ValueError(f'study {study.name!r}: preset names {bad} must be letters and digits, not "cpu", '
                         f'and not start with a scale field ({", ".join(fields)})')
    STUDIES[study.name] = study
    return study


def result_path(study: str, scale: str, config: str, seed: int) -> Path:
    return results_root() / study / scale / config / f'seed{seed}.json'


class RunState:
    """The resumable state of one run: `load()` what an interrupted run saved, `save()` after each epoch."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / 'state.pth'

    def load(self) -> Optional[Dict[str, Any]]:
        if not self.path.is_file():
            return None
        return torch.load(self.path, map_location='cpu', weights_only=True)

    def save(self, state: Dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_save(state, str(self.path))

    def clear(self) -> None:
        if self.path.is_file():
            self.path.unlink()


def _versions() -> Dict[str, str]:
    import timm
    import torchvision
    from timm_isomix import __version__
    return {'python': platform.python_version(), 'torch': torch.__version__, 'torchvision': torchvision.__version__,
            'timm': timm.__version__, 'timm_isomix': __version__, 'machine': platform.machine(),
            'threads': torch.get_num_threads()}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float):
        return round(value, 6)
    return value


def finished_runs(study: str, scale: str = 'cpu') -> Dict[str, Dict[int, Dict[str, Any]]]:
    """config -> seed -> the stored result file, for every finished run of a study at a scale."""
    out: Dict[str, Dict[int, Dict[str, Any]]] = {}
    folder = results_root() / study / scale
    for path in sorted(folder.glob('*/seed*.json')):
        record = json.loads(path.read_text())
        out.setdefault(record['config_name'], {})[int(record['seed'])] = record
    return out


def run_one(study: Study, config_name: str, seed: int, scale: Scale, preset: Optional[str] = None) -> Dict[str, Any]:
    """Run (or resume, or skip if finished) one configuration-seed; return its stored record.

    At a preset's scale (`preset` names it; `scale` is that preset's Scale, possibly with fields overridden)
    the configuration is the study's with the preset's `overrides` merged in, and the record stores it so.
    """
    if config_name not in study.configs:
        raise KeyError(f'study {study.name!r} has no configuration {config_name!r}; it has {list(study.configs)}')
    scale_name = study.scale_name(scale, preset)
    path = result_path(study.name, scale_name, config_name, seed)
    if path.is_file():
        return json.loads(path.read_text())
    state = RunState(state_root() / study.name / scale_name / config_name / f'seed{seed}')
    config = merge_config(study.configs[config_name], scale.overrides)
    start = time.time()
    saved = state.load()
    elapsed_before = float(saved.get('wall_time', 0.)) if saved else 0.
    result = study.run(dict(config), seed, scale, state)
    history = result.pop('history', [])
    record = {
        'study': study.name, 'config_name': config_name, 'config': _plain(config), 'seed': seed,
        'scale': scale_name, 'scale_fields': dataclasses.asdict(scale), 'versions': _versions(),
        'wall_time': round(elapsed_before + time.time() - start, 1), 'resumed': saved is not None,
        'history': _plain(history), 'result': _plain(result),
    }
    if preset is not None:
        record['preset'] = preset
    from timm_isomix.tasks.fit import default_precision
    if any(default_precision().values()):  # the in-memory loop's bf16 autocast or channels_last ($ISOMIX_AMP, ...)
        record['precision'] = default_precision()
    atomic_write_bytes(json.dumps(record, indent=1).encode(), str(path))
    state.clear()
    return record


def run_study(study: Study, seeds: Sequence[int], scale: Scale, configs: Optional[Sequence[str]] = None,
              jobs: int = 1, threads: Optional[int] = None, log=print, preset: Optional[str] = None) -> List[str]:
    """Run every (configuration, seed) not finished yet; `jobs` > 1 runs them in parallel subprocesses.
    `preset`: `scale` is that preset's (run_one).

    Returns the names of the runs that failed (their errors are logged; the others go on).
    """
    configs = list(configs or study.configs)
    unknown = [c for c in configs if c not in study.configs]
    if unknown:
        raise KeyError(f'study {study.name!r} has no configurations {unknown}; it has {list(study.configs)}')
    scale_name = study.scale_name(scale, preset)
    todo = [(c, s) for s in seeds for c in configs if not result_path(study.name, scale_name, c, s).is_file()]
    log(f'{study.name} [{scale_name}]: {len(todo)} of {len(configs) * len(seeds)} runs to do')
    failed = []
    if jobs <= 1:
        if threads:
            torch.set_num_threads(threads)
        for c, s in todo:
            t = time.time()
            try:
                record = run_one(study, c, s, scale, preset)
            except Exception as e:  # one failing run does not stop the study
                log(f'  {c} seed {s}: FAILED {type(e).__name__}: {e}')
                failed.append(f'{c}/seed{s}')
                continue
            log(f'  {c} seed {s}: top-1 {record["result"].get("top1", float("nan")):.2f} '
                f'({time.time() - t:.0f} s)')
        return failed
    return _run_parallel(study, todo, scale, jobs, threads or 1, log, preset)


def _run_parallel(study: Study, todo, scale: Scale, jobs: int, threads: int, log, preset: Optional[str]) -> List[str]:
    scale_args = scale.flags() + (['--preset', preset] if preset is not None else [])
    pending, running, failed = list(todo), [], []
    while pending or running:
        while pending and len(running) < jobs:
            c, s = pending.pop(0)
            cmd = [sys.executable, '-m', 'experiments', 'run', study.name, '--configs', c,
                   '--seeds', str(s), '--jobs', '1', '--threads', str(threads), *scale_args]
            running.append(((c, s), subprocess.Popen(cmd)))
        time.sleep(1.)
        for item in list(running):
            (c, s), proc = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode != 0:
                    failed.append(f'{c}/seed{s}')
                log(f'  {c} seed {s}: {"done" if proc.returncode == 0 else "FAILED"}')
    return failed
