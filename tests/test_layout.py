"""The package's layers: each module imports only from its own layer or the layers below it, with no
import circle; modules and functions stay small enough to read in one sitting. The research workspace
(experiments/) sits beside the package, imports it by its installed name, and is not part of it."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / 'timm_isomix'
WORKSPACE = ROOT / 'experiments'
# lower index = lower layer; a module may import from its own layer and the ones below
LAYERS = [('bank', 'blocks'), ('models',), ('train',), ('tasks',), ('hub', 'tools')]
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 100


def _modules():
    for path in sorted(PKG.rglob('*.py')):
        parts = path.relative_to(PKG).with_suffix('').parts
        if parts[-1] == '__init__':
            parts = parts[:-1]
        yield '.'.join(parts), path


def _layer(module: str) -> int:
    top = module.split('.')[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f'module timm_isomix.{module} is in no layer; add its folder to LAYERS')


def _imports(module: str, path: Path):
    """Package-relative names of the timm_isomix modules `module` imports (at any depth of the file)."""
    package = module.split('.') if path.name == '__init__.py' else module.split('.')[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = '.'.join(base + ([node.module] if node.module else []))
            elif (node.module or '').startswith('timm_isomix'):
                name = node.module[len('timm_isomix.'):] if node.module != 'timm_isomix' else ''
            else:
                continue
            yield name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith('timm_isomix.'):
                    yield alias.name[len('timm_isomix.'):]


def test_no_module_imports_from_a_higher_layer():
    bad = []
    for module, path in _modules():
        if not module:  # the package facade re-exports the method and the models
            continue
        for name in _imports(module, path):
            if name and _layer(name) > _layer(module):
                bad.append(f'{module} imports {name}')
    assert not bad, bad


def test_there_is_no_import_circle():
    graph = {m: {n for n in _imports(m, p) if n} for m, p in _modules() if m}
    graph = {m: {n for n in deps if n in graph or any(k.startswith(n + '.') for k in graph)} for m, deps in graph.items()}
    state = {}

    def visit(m, stack):
        state[m] = 'open'
        for n in graph.get(m, ()):
            if state.get(n) == 'open' and n != m:
                raise AssertionError(f'import circle: {" -> ".join(stack + [m, n])}')
            if n not in state:
                visit(n, stack + [m])
        state[m] = 'done'
    for m in graph:
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize('module,path', list(_modules()), ids=lambda v: str(v))
def test_modules_and_functions_stay_small(module, path):
    _check_size(path)


def _check_size(path: Path) -> None:
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f'{path} has {len(source.splitlines())} lines'
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            assert n <= MAX_FUNCTION_LINES, f'{path}:{node.lineno} {node.name}() has {n} lines'


def test_no_two_modules_share_a_name_in_the_library_or_the_workspace():
    seen = {}
    for path in sorted([*PKG.rglob('*.py'), *WORKSPACE.rglob('*.py')]):
        if path.name in ('__init__.py', '__main__.py', '_base.py'):
            continue
        seen.setdefault(path.stem, []).append(str(path.relative_to(ROOT)))
    assert not {k: v for k, v in seen.items() if len(v) > 1}


def test_the_library_does_not_know_where_the_project_keeps_its_data_or_results():
    bad = [str(p.relative_to(ROOT)) for p in PKG.rglob('*.py')
           if re.search(r"'shared' / 'data'|shared/data|'experiments' / 'results'|experiments/results", p.read_text())]
    assert not bad, f'library modules naming the workspace or the shared data folder: {bad}'


def test_the_workspace_imports_the_library_by_its_installed_name_only():
    bad = []
    for path in WORKSPACE.rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and path.parent == WORKSPACE and node.level > 1:
                bad.append(f'{path.relative_to(ROOT)}: from {"." * node.level}{node.module or ""}')
            if isinstance(node, ast.ImportFrom) and node.level > 2:
                bad.append(f'{path.relative_to(ROOT)}: from {"." * node.level}{node.module or ""}')
    assert not bad, bad


@pytest.mark.parametrize('path', sorted(WORKSPACE.rglob('*.py')), ids=lambda p: str(p.relative_to(ROOT)))
def test_workspace_modules_and_functions_stay_small(path):
    _check_size(path)
