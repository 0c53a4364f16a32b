"""The research workspace's study runner (run from the checkout's root): `python -m experiments run STUDY --seeds 0 1 2`, `report STUDY`, `list`, `index`.

A *study* is a named set of *configurations* (plain dicts) and one function that trains and measures one
configuration for one seed. Each (study, configuration, seed) run is stored as one JSON file,
`experiments/results/<study>/<scale>/<configuration>/seed<k>.json`, holding the full configuration, the
scale it ran at, package versions, wall time, the per-epoch history and the result. Finished runs are
skipped; an interrupted run resumes from its last epoch (its state lives under `output/experiments/`),
so a study can be completed over several invocations. `report` turns the result files into the study's report
(its tables: mean +- std over seeds, and n; its verdicts, `verdicts.py`; the commands that reproduce it) and plots;
`index` writes the results index, docs/results.md, and the generated tables of README and docs.

Defining a study (a module under `studies/`, imported by `studies/__init__.py`):

    register(Study(
        name='reuse-cifar10', description='...',
        configs={'reuse1': dict(model='isomix_iso_64_8_p2', ...), 'reuse2': dict(...)},
        run=train_classifier,           # (config, seed, scale, state) -> result dict with 'top1', 'params'
        scale=Scale(epochs=8, train_limit=10000)))

The default scale is sized for a 2-core CPU (one configuration-seed in about 10 minutes or less);
`--epochs`, `--train-limit`, `--val-limit`, `--width-mult` and `--batch-size` scale it up on a bigger
machine, and such runs are stored under their own scale name, never mixed with the default ones.
"""
import os
from pathlib import Path

# The workspace's datasets are the archives in ../shared/data beside the checkout, unless $ISOMIX_DATA names
# another folder; the library itself only reads the folder it is given.
_SHARED_DATA = Path(__file__).resolve().parent.parent.parent / 'shared' / 'data'
if not os.environ.get('ISOMIX_DATA') and _SHARED_DATA.is_dir():
    os.environ['ISOMIX_DATA'] = str(_SHARED_DATA)

from .runner import STUDIES, RunState, Scale, Study, register  # noqa: E402

__all__ = ['STUDIES', 'RunState', 'Scale', 'Study', 'register']
