"""The results index and the generated parts of README and docs, from the result files and the tree.

    python -m experiments index            # write docs/results.md, refresh every generated block
    python -m experiments index --check    # exit 1, naming them, when any is out of date

docs/results.md is generated whole: per claim, each study scale's question, verdict and finding
(`verdicts.py`) and a link to its report; study scales with fewer than 3 seeds per configuration are listed
as in progress. In README.md and docs/*.md a generated block is

    <!-- generated: KIND [FILE] -->
    ...
    <!-- end generated -->

whose body is `BLOCKS[KIND]` of the page's folder (and FILE, a result file under experiments/results/): the
model table, the claims table, the shipped weights' results, the routing benchmark, a benchmark's cases and
targets, timm's train.py run, the main job's output, the layout tree. No number in a results table is typed by
hand: tests/test_docs.py checks every block, and that every table of numbers is one.
"""
import argparse
import ast
import csv
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .runner import REPO_ROOT, STUDIES, finished_runs, results_root
from .verdicts import CLAIMS, VERDICTS, Results, verdicts_of
from . import studies  # noqa: F401  (registers the studies)

__all__ = ['BLOCKS', 'study_scales', 'results_index', 'refresh', 'out_of_date', 'main']

BLOCK = re.compile(r'(?P<open><!-- generated: (?P<kind>[\w-]+)(?: (?P<arg>[\w.-]+))? -->\n)(?P<body>.*?)'
                   r'(?P<close><!-- end generated -->)', re.S)
DOCS = REPO_ROOT / 'docs'
LINKED = REPO_ROOT / 'experiments' / 'results'  # where the links point: the committed result files


def _link(target: Path, base: Path) -> str:
    return Path(os.path.relpath(target, base)).as_posix()


def study_scales() -> List[tuple]:
    """(study, scale, complete) for every scale folder holding result files; complete: the study's seeds (3, or
    1 for a selection study) for every configuration."""
    out = []
    # the verdicts' order (the papers' claims), then any other study: the same order whatever registers first
    for name in [*(s for s in VERDICTS if s in STUDIES), *sorted(set(STUDIES) - set(VERDICTS))]:
        folder = results_root() / name
        for scale in sorted(d.name for d in folder.glob('*') if d.is_dir()) if folder.is_dir() else []:
            runs = finished_runs(name, scale)
            if runs:
                out.append((name, scale, all(len(seeds) >= STUDIES[name].min_seeds for seeds in runs.values())))
    return out


def _report(study: str, scale: str, base: Path) -> str:
    label = study if scale == 'cpu' else f'{study} ({scale})'
    return f'[{label}]({_link(LINKED / study / scale / "report.md", base)})'


def claims_table(base: Path, arg=None) -> str:
    """README's claims table: each claim in the papers' words, its verdict, the reports that back it."""
    lines = ['| claim | verdict | reports |', '|---|---|---|']
    backing = {key: [] for key in CLAIMS}
    for study, scale, complete in study_scales():
        for v in verdicts_of(study, scale) if complete else []:
            backing[v.claim].append((study, scale, v.verdict))
    for key, words in CLAIMS.items():
        found = backing[key]
        verdicts = {v for _, _, v in found}
        verdict = verdicts.pop() if len(verdicts) == 1 else '; '.join(
            f'{v} ({s}{"" if c == "cpu" else ", " + c})' for s, c, v in found)
        lines.append(f'| {words} | {verdict} | {", ".join(_report(s, c, base) for s, c, _ in found)} |')
    return '\n'.join(lines)


_INTRO = '''# Results

Every number below and in the reports comes from the result files under `experiments/results/<study>/<scale>/`
(one JSON per configuration and seed: the configuration, versions, wall time, per-epoch history and result),
written by the study runner. A study's report holds its tables, its verdicts and the commands that reproduce it;
this page is generated from the same files (`python -m experiments index`).

    python -m experiments run STUDY --seeds 0 1 2 --jobs 2 --threads 1   # resumes; finished runs are skipped
    python -m experiments report STUDY                                   # report.md, report.json, curves.png
    python -m experiments.task_report STUDY                              # sharing.md (multi-task, transfer,
                                                                         # adaptation and routing studies)

The default scale (`cpu`) of each study is sized for a CPU: one torch thread per run, two runs at a time, so the
training times are wall-clock under load. `--epochs`, `--train-limit all`, `--val-limit all`, `--batch-size` and
`--width-mult` scale a study up; such runs are stored under their own scale name, never mixed with the default
ones. The last-epoch validation top-1 is reported; nothing is selected on validation data. A verdict is one of
supported, not shown at this scale, or contradicted, and holds for the scale it was measured at.

Other measurements: the main job's output ([training](training.md#main-job)), speed and memory against timm's
models ([performance](performance.md)), the routed layers' cost ([Routing Networks](routing.md)), tasks as
adapters ([adapters](adapters.md)), and the studies on a GPU ([running at scale](scale.md)). The tables of numbers
in README and these pages are generated from the result files as well, never typed: a block
`<!-- generated: KIND [FILE] -->` ... `<!-- end generated -->` whose body `python -m experiments index` writes
(`experiments/index.py` lists the kinds: the model table, the claims, the shipped weights, a benchmark's cases and
targets, the routing benchmark, timm's train.py run, the main job, the layout tree).
'''


def results_index(base: Path = DOCS) -> str:
    """docs/results.md: the claims table, then per claim each backing study scale's question, verdict, finding."""
    results, scales = Results(), study_scales()
    parts = [_INTRO, '## Claims', claims_table(base)]
    for key, words in CLAIMS.items():
        entries = []
        for study, scale, complete in scales:
            for v in verdicts_of(study, scale) if complete else []:
                if v.claim == key:
                    entries.append(f'- {_report(study, scale, base)}: *{v.question}* '
                                   f'**{v.verdict.capitalize()}.** {v.sentence(results, scale)}')
        if entries:
            parts += [f'## {words[0].upper()}{words[1:]}', '\n'.join(entries)]
    other = [(s, c) for s, c, complete in scales if complete and not verdicts_of(s, c)]
    if other:  # studies that measure the library rather than test a claim
        lines = []
        for study, scale in other:
            folder = LINKED / study / scale
            pages = [p for p in ('comparison.md', 'report.md') if (folder / p).is_file()]
            link = f'[{pages[0]}]({_link(folder / pages[0], base)})' if pages else \
                f'[result files]({_link(folder, base)}/)'
            lines.append(f'- `{study}` at scale `{scale}` ({link}): {STUDIES[study].description}')
        parts += ['## Other studies', '\n'.join(lines)]
    waiting = [(s, c) for s, c, complete in scales if not complete]
    if waiting:
        lines = []
        for study, scale in waiting:
            folder = _link(LINKED / study / scale, base)
            lines.append(f'- `{study}` at scale `{scale}`: in progress: fewer than {STUDIES[study].min_seeds} seeds '
                         f'per configuration ([result files]({folder}/)).')
        parts += ['## In progress', '\n'.join(lines)]
    return '\n\n'.join(parts) + '\n'


def _weights(base: Path, arg=None) -> str:
    lines = ['| tag | val images | top-1 | top-5 | params (M) | recipe | result file |', '|' + '---|' * 7]
    for path in sorted((results_root() / 'weights').glob('*.json')):
        row = json.loads(path.read_text())[0]
        model, dataset = row['model'].split('.', 1)
        recipe = REPO_ROOT / 'hparams' / f'{model}_{dataset}.yaml'
        epochs = re.search(r'^epochs:\s*(\d+)', recipe.read_text(), re.M).group(1)
        lines.append(f'| `{row["model"]}` | {row["samples"]:,} | {row["top1"]:.2f} | {row["top5"]:.2f} | '
                     f'{row["param_count"]:.2f} | [`{recipe.name}`]({_link(recipe, base)}), {epochs} epochs | '
                     f'[`{path.name}`]({_link(LINKED / "weights" / path.name, base)}) |')
    return '\n'.join(lines)


def _routing_bench(base: Path, arg=None) -> str:
    path = results_root() / 'routing-bench-cpu.json'
    data = json.loads(path.read_text())
    target = data['target_ratio']
    lines = [f'`{data["command"]}` (batch {data["batch"]}, {data["img_size"]} px, {data["reps"]} repetitions, '
             f'{data["machine"]["threads"]} thread; [`{path.name}`]({_link(LINKED / path.name, base)})):', '',
             f'| case | plain (ms) | routed (ms) | routed / plain | <= {target} |', '|---|---|---|---|---|']
    for case, r in data['results'].items():
        lines.append(f'| `{case}` | {r["plain_ms"]:.1f} | {r["routed_ms"]:.1f} | {r["ratio"]:.3f} | '
                     f'{"yes" if data["targets_met"][case] else "no"} |')
    return '\n'.join(lines)


def _tasks_bench(base: Path, arg=None) -> str:
    from timm_isomix.tools.bench_tasks import format_table
    path = results_root() / 'tasks-bench-cpu.json'
    data = json.loads(path.read_text())
    return (f'`{data["command"]}` (batch {data["batch"]} over {data["num_tasks"]} tasks, {data["reps"]} repetitions, '
            f'{data["machine"]["threads"]} thread; [`{path.name}`]({_link(LINKED / path.name, base)})):\n\n'
            + format_table(data))


def _timm_train_py(base: Path, arg=None) -> str:
    path = results_root() / 'timm-train-py' / 'usps-50-per-class-summary.csv'
    lines = [f'[`{path.name}`]({_link(LINKED / "timm-train-py" / path.name, base)}), timm\'s summary.csv:', '',
             '| epoch | train loss | val loss | val top-1 | val top-5 |', '|---|---|---|---|---|']
    with open(path, newline='') as f:
        for row in csv.DictReader(f):
            lines.append(f'| {int(row["epoch"]) + 1} | {float(row["train_loss"]):.3f} | '
                         f'{float(row["eval_loss"]):.3f} | {float(row["eval_top1"]):.1f} | {float(row["eval_top5"]):.1f} |')
    return '\n'.join(lines)


def _main_job(base: Path, arg=None) -> str:
    path = results_root() / 'main-job' / 'output.txt'
    return '\n'.join(f'    {line}' for line in path.read_text().strip().splitlines())


def _models(base: Path, arg=None) -> str:
    from timm_isomix.tools.summary import model_table
    return model_table()


def _summary(path: Path) -> str:
    """The first sentence of a module's docstring."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ''
    first = ' '.join(doc.split('\n\n')[0].split())
    first = re.sub(r' \(issues? [\d, ]+\)', '', first)  # the tree says what a module is, not where it came from
    return re.split(r'(?<=\.)\s', first, maxsplit=1)[0]


_TOP = {'README.md': 'what the library is, install, use, models, claims', 'docs/': 'one page per topic',
        'timm_isomix/': None, 'experiments/': None, 'tests/': 'the specification: pytest -q',
        'hparams/': 'YAML recipes for train.py (`-c`, `--tasks`)', 'train.py': 'thin entry point: timm\'s flags',
        'validate.py': 'thin entry point: timm\'s flags', 'main_job.sh': 'set up, train and validate two models',
        'pyproject.toml': 'the package: lower bounds, extras', 'constraints.txt': 'the exact versions tested',
        '.ci/run': 'CI: a fresh venv, the tested versions, pytest'}


def _tree(folder: Path, depth: int) -> List[str]:
    lines = []
    for path in sorted(folder.iterdir(), key=lambda p: (p.is_dir(), p.name)):
        indent = '  ' * depth
        if path.suffix == '.py' and path.name != '__init__.py':
            lines.append(f'{indent}- `{path.name}`: {_summary(path)}')
        elif path.is_dir() and (path / '__init__.py').is_file():
            lines.append(f'{indent}- `{path.name}/`: {_summary(path / "__init__.py")}')
            lines += _tree(path, depth + 1)
        elif path.is_dir() and path.name == 'weights':
            lines.append(f'{indent}- `weights/`: the shipped weights of the published tags (package data)')
        elif path.is_dir() and path.name == 'results':
            lines.append(f'{indent}- `results/`: the result files, one folder per study and scale, and the reports')
    return lines


def _layout(base: Path, arg=None) -> str:
    lines = []
    for name, what in _TOP.items():
        if not (REPO_ROOT / name).exists():
            continue
        if name in ('timm_isomix/', 'experiments/'):
            lines.append(f'- `{name}`: {_summary(REPO_ROOT / name / "__init__.py")}')
            lines += _tree(REPO_ROOT / name, 1)
        else:
            lines.append(f'- `{name}`: {what}')
    return '\n'.join(lines)


# a benchmark JSON's case columns: (key, heading, format); a column shows when any case has a value
_BENCH = [('train_flops_per_image', 'GFLOP/img (train)', lambda v: f'{v / 1e9:.2f}'),
          ('train_img_s', 'train img/s', '{:.1f}'), ('train_ratio', 'ratio', '{:.3f}'),
          ('train_system_s_per_step', 'sys s/step', '{:.2f}'),
          ('train_page_fault_mb_per_step', 'page-faulted MB/step', '{:.0f}'),
          ('infer_img_s', 'infer img/s', '{:.1f}'), ('infer_ratio', 'ratio', '{:.3f}'),
          ('mix_share', 'mix share', lambda v: f'{100 * v:.1f} %'), ('peak_memory_mb', 'peak MB', '{:.0f}'),
          ('peak_memory_ratio', 'ratio', '{:.3f}'), ('compiled_train_img_s', 'compiled train img/s', '{:.1f}'),
          ('compiled_infer_img_s', 'compiled infer img/s', '{:.1f}')]


def _benchmark(base: Path, name: str) -> str:
    """The cases of a `timm_isomix.tools.benchmark` JSON: one row per case, ratios against its reference."""
    path = results_root() / name
    data = json.loads(path.read_text())
    cases = data['cases']
    columns = [c for c in _BENCH if any(case.get(c[0]) is not None for case in cases.values())]
    lines = [f'`{data["command"]}` ([`{name}`]({_link(LINKED / name, base)})):', '',
             '| case | ' + ' | '.join(h for _, h, _ in columns) + ' |', '|' + '---|' * (len(columns) + 1)]
    for case_name, case in cases.items():
        cells = [(f.format if isinstance(f, str) else f)(case[k]) if case.get(k) is not None else '–'
                 for k, _, f in columns]
        lines.append(f'| {case_name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def _benchmark_targets(base: Path, name: str) -> str:
    """The targets of a benchmark JSON: measured value, threshold, met."""
    data = json.loads((results_root() / name).read_text())
    lines = ['| target | measured | threshold | |', '|---|---|---|---|']
    for t in data['targets']:
        met = 'n/a' if t['met'] is None else ('met' if t['met'] else 'missed')
        value = '–' if t['value'] is None else f'{t["value"]:.3f}'
        lines.append(f'| {t["target"]} | {value} | {"≤" if t.get("at_most") else "≥"} {t["threshold"]:g} | {met} |')
    return '\n'.join(lines)


def _speed_gap(base: Path, name: str) -> str:
    """experiments/speed_gap.py's result: per allocator, protocol and model, the median step and its ratio."""
    data = json.loads((results_root() / name).read_text())
    lines = [f'`{data["command"]}` ([`{name}`]({_link(LINKED / name, base)})):', '',
             '| allocator | protocol | model | step s | ratio | per launch | sys s/step | page-faulted MB/step |',
             '|---|---|---|---|---|---|---|---|']
    for r in data['summary']:
        launches = ', '.join(f'{v:.3f}' for v in r['ratio_per_launch'])
        lines.append(f"| {r['allocator']} | {r['protocol']} | {r['model']} | {r['step_s']:.3f} | {r['ratio']:.3f} | "
                     f"{launches} | {r['system_s']:.3f} | {r['fault_mb']:.0f} |")
    return '\n'.join(lines)


def _memory_parity(base: Path, name: str) -> str:
    """experiments/memory_parity.py's result: the median peak of each model and the ratios to its reference."""
    data = json.loads((results_root() / name).read_text())
    lines = [f'`{data["command"]}` ([`{name}`]({_link(LINKED / name, base)})):', '',
             '| model | peak MB (median) | launches | / reference | ratio | ≤ 1.05 |', '|---|---|---|---|---|---|']
    ratios = {r['model']: r for r in data['ratios']}
    for model, peak in data['median_mb'].items():
        r = ratios.get(model)
        cells = [r['reference'], f"{r['ratio']:.3f}", 'yes' if r['within'] else 'no'] if r else ['–', '–', '–']
        launches = ', '.join(f'{v:.0f}' for v in data['peak_mb'][model])
        lines.append(f'| {model} | {peak:.0f} | {launches} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def _adapters_vs_lora(base: Path, arg=None) -> str:
    """The adapters-vs-LoRA table and the verdict of its rule (experiments/lora_report.py)."""
    from . import lora_report
    table = lora_report.rows()
    if not table:
        return 'No finished runs yet.'
    v = lora_report.verdicts(table)
    folder = LINKED / lora_report.COMPARE / 'cpu'
    per_task = '; '.join(f'{lora_report.TASK_TITLES[t]}: {v[t]}' for t in lora_report.TASKS if v.get(t))
    return (f'{lora_report.comparison_table(table)}\n\n{lora_report.MATCHED_TO} against lora_matched, per task: '
            f'{per_task or "not all runs finished"}. Verdict: **{v["overall"] or "in progress"}** '
            f'([comparison]({_link(folder / "comparison.md", base)}), with its figure and the held-out choice).')


BLOCKS: Dict[str, Callable[[Path, Optional[str]], str]] = {
    'models': _models, 'claims': claims_table, 'weights': _weights, 'routing-bench': _routing_bench,
    'tasks-bench': _tasks_bench,
    'benchmark': _benchmark, 'benchmark-targets': _benchmark_targets, 'timm-train-py': _timm_train_py,
    'main-job': _main_job, 'layout': _layout, 'speed-gap': _speed_gap, 'memory-parity': _memory_parity,
    'adapters-vs-lora': _adapters_vs_lora,
}


def refresh(text: str, base: Path) -> str:
    """`text` with every generated block's body made again (links relative to `base`, the page's folder)."""
    def body(m: re.Match) -> str:
        if m['kind'] not in BLOCKS:
            raise KeyError(f'unknown generated block {m["kind"]!r}; kinds: {", ".join(BLOCKS)}')
        return m['open'] + BLOCKS[m['kind']](base, m['arg']).rstrip('\n') + '\n' + m['close']
    return BLOCK.sub(body, text)


def pages() -> List[Path]:
    return [REPO_ROOT / 'README.md', *sorted(p for p in DOCS.glob('*.md') if p.name != 'results.md')]


def out_of_date() -> List[str]:
    """The pages whose generated text differs from what the result files and the tree give now."""
    stale = [str(p.relative_to(REPO_ROOT)) for p in pages() if refresh(p.read_text(), p.parent) != p.read_text()]
    index = DOCS / 'results.md'
    if not index.is_file() or index.read_text() != results_index():
        stale.append('docs/results.md')
    return stale


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='python -m experiments index', description=__doc__.splitlines()[0])
    p.add_argument('--check', action='store_true', help='write nothing; exit 1 when a page is out of date')
    args = p.parse_args(argv)
    if args.check:
        stale = out_of_date()
        for name in stale:
            print(f'out of date: {name} (python -m experiments index)', file=sys.stderr)
        return 1 if stale else 0
    DOCS.mkdir(exist_ok=True)
    (DOCS / 'results.md').write_text(results_index())
    for page in pages():
        text = page.read_text()
        new = refresh(text, page.parent)
        if new != text:
            page.write_text(new)
            print(f'refreshed {page.relative_to(REPO_ROOT)}')
    print('wrote docs/results.md')
    return 0


if __name__ == '__main__':
    sys.exit(main())
