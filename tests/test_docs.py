"""README and docs: numbers that come from the result files and are never typed twice, links that resolve, a layout
page that matches the tree, a README a user reads in one screen, and claims named in the papers' words."""
import json
import re
import shutil
from pathlib import Path

import pytest

from experiments import index
from experiments.report import report_text, summarize
from experiments.runner import STUDIES
from experiments.task_report import task_report_text
from experiments.verdicts import CLAIMS, CONTRADICTED, NOT_SHOWN, SUPPORTED, VERDICTS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
DOCS = ROOT / 'docs'
RESULTS = ROOT / 'experiments' / 'results'
PAGES = [README, *sorted(DOCS.glob('*.md'))]
REPORTS = sorted(RESULTS.glob('*/*/report.md'))
README_SECTIONS = ['Install', 'Use', 'Models', 'Claims', 'Set up and test', 'Citation']


def _tables(text: str):
    """Each markdown table outside the generated blocks, as its lines."""
    text = index.BLOCK.sub('', text)
    table = []
    for line in text.splitlines() + ['']:
        if line.startswith('|'):
            table.append(line)
        elif table:
            yield table
            table = []


def test_every_generated_block_and_the_results_index_agree_with_the_result_files():
    assert index.out_of_date() == [], 'run: python -m experiments index'


@pytest.mark.parametrize('page', [p for p in PAGES if p.name != 'results.md'], ids=lambda p: p.name)
def test_no_table_of_numbers_is_typed_by_hand(page):
    """A table with a decimal number (outside code) is a results table: it must be a generated block."""
    for table in _tables(page.read_text()):
        prose = re.sub(r'`[^`]*`', '', '\n'.join(table))
        assert not re.search(r'\d\.\d', prose), f'{page.name}: a hand-typed table of numbers:\n' + '\n'.join(table[:3])


@pytest.mark.parametrize('report', REPORTS, ids=lambda p: f'{p.parent.parent.name}/{p.parent.name}')
def test_each_report_is_what_its_result_files_give(report):
    study, scale = STUDIES[report.parent.parent.name], report.parent.name
    assert report.read_text() == report_text(study, scale), f'run: python -m experiments report {study.name}'
    assert json.loads((report.parent / 'report.json').read_text()) == json.loads(json.dumps(summarize(study, scale)))
    if (report.parent / 'sharing.md').is_file():
        assert (report.parent / 'sharing.md').read_text() == task_report_text(study.name, scale)


def test_a_changed_number_in_a_page_or_in_a_result_file_fails_the_check(tmp_path, monkeypatch):
    page = (DOCS / 'models.md').read_text()
    row = next(line for line in page.splitlines() if line.startswith('| `isomix_iso_64_8_p4.cifar10`'))
    top1 = row.split(' | ')[2]
    edited = page.replace(row, row.replace(f' {top1} ', f' {float(top1) + 0.01:.2f} '))
    assert edited != page and index.refresh(edited, DOCS) == page  # the edit is found and undone
    assert index.refresh(page, DOCS) == page

    results = tmp_path / 'results'
    shutil.copytree(RESULTS, results)
    monkeypatch.setenv('ISOMIX_RESULTS', str(results))
    seed = results / 'multitask-digits-cifar10' / 'cpu' / 'isomix' / 'seed0.json'
    record = json.loads(seed.read_text())
    record['result']['top1'] += 3.0
    seed.write_text(json.dumps(record))
    report = report_text(STUDIES['multitask-digits-cifar10'])
    committed = (RESULTS / 'multitask-digits-cifar10' / 'cpu' / 'report.md').read_text()
    changed = [(a, b) for a, b in zip(committed.splitlines(), report.splitlines()) if a != b]
    assert [a.split(' | ')[1] for a, _ in changed if a.startswith('| `isomix`')] == ['75.66 ± 0.51']
    assert any(b.startswith('| `isomix` | 76.66 ± ') for _, b in changed)
    assert any(a.startswith('**Supported.**') for a, _ in changed)  # the verdict's numbers follow the files
    assert index.results_index() != (DOCS / 'results.md').read_text()


def test_readme_is_one_screen_of_sections_in_order():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250
    assert [line[3:] for line in lines if line.startswith('## ')] == README_SECTIONS
    intro = '\n'.join(lines[:lines.index('## Install')])
    assert 'theta_l = sum_k alpha_lk * T_k' in intro and 'softmax' in intro
    text = '\n'.join(lines)
    assert 'pip install -e .' in text and 'pip install timm-isomix' in text
    assert all(extra in text for extra in ('[plot]', '[experiments]', '[test]'))
    assert 'bash main_job.sh' in text and "pip install -c constraints.txt -e '.[test]' && pytest -q" in text
    assert text.count('@article{') + text.count('@inproceedings{') == 2


def test_readme_links_every_docs_page():
    text = README.read_text()
    assert [p.name for p in DOCS.glob('*.md') if f'(docs/{p.name})' not in text] == []


@pytest.mark.parametrize('page', PAGES + REPORTS + sorted(RESULTS.glob('*/*/sharing.md')),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    text = re.sub(r'```.*?```', '', page.read_text(), flags=re.S)
    targets = re.findall(r'\]\(([^)\s]+)\)', text)
    missing = [t for t in targets if not re.match(r'[a-z]+:', t)
               and not (page.parent / t.split('#')[0]).exists()]
    assert not missing, f'{page.relative_to(ROOT)}: links to missing files: {missing}'


def test_the_layout_page_lists_every_module_of_the_library_and_the_workspace():
    block = index.BLOCK.search((DOCS / 'layout.md').read_text())
    assert block and block['kind'] == 'layout'
    listed, stack = set(), []
    for line in block['body'].splitlines():
        depth, name = (len(line) - len(line.lstrip())) // 2, re.match(r'\s*- `([^`]+)`', line).group(1)
        stack[depth:] = [name]
        listed.add(''.join(stack))
    modules = {str(p.relative_to(ROOT)) for folder in ('timm_isomix', 'experiments')
               for p in (ROOT / folder).rglob('*.py') if p.name != '__init__.py' and 'results' not in p.parts}
    assert modules - listed == set()
    assert [p for p in listed if not (ROOT / p).exists()] == []


def test_every_study_scale_has_a_verdict_or_is_listed_as_another_study_or_in_progress():
    words = {SUPPORTED, NOT_SHOWN, CONTRADICTED}
    assert {v.verdict for scales in VERDICTS.values() for vs in scales.values() for v in vs} <= words
    assert {v.claim for scales in VERDICTS.values() for vs in scales.values() for v in vs} == set(CLAIMS)
    text = (DOCS / 'results.md').read_text()
    sections = {part.split('\n', 1)[0]: part for part in re.split(r'^## ', text, flags=re.M)}
    other, progress = sections.pop('Other studies', ''), sections.pop('In progress', '')
    claims = '\n'.join(sections.values())
    for study, scale, complete in index.study_scales():
        if not complete:
            assert f'`{study}` at scale `{scale}`: in progress' in progress
        elif VERDICTS.get(study, {}).get(scale):
            assert f'{study}/{scale}/report.md' in claims
        else:
            assert f'`{study}` at scale `{scale}` (' in other


def test_claims_are_named_in_the_papers_words_not_lettered():
    files = [*PAGES, *REPORTS, *(ROOT / 'experiments').rglob('*.py')]
    lettered = re.compile(r'\bclaims? \(?[a-e]\)|\([a-d]\) (multi-task|a new task|adaptation|higher accuracy)', re.I)
    assert [str(p.relative_to(ROOT)) for p in files if lettered.search(p.read_text())] == []
    claims = index.claims_table(ROOT)
    assert 'competitive multi-task learning with soft weight sharing' in claims
    assert 'unsupervised multi-source domain adaptation by only manipulating the order of pretrained modules' in claims


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.name)
def test_pages_state_behaviour_not_history_or_this_machine(page):
    found = re.findall(r'fixed:|an earlier version|what was tried|\bnext:|2-core|this VM|shared/data|\bissue \d+',
                       page.read_text(), re.I)
    assert not found, f'{page.name}: {found}'
