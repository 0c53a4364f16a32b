"""What an installer gets: the wheel holds the library only, its metadata pins nothing exactly, and the
package imports and builds models without the plotting extra."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp('wheel')
    proc = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation',
                           '-w', str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = out.glob('timm_isomix-*.whl')
    return zipfile.ZipFile(path)


def test_the_wheel_holds_the_library_and_its_shipped_weights_but_not_the_workspace(wheel):
    names = wheel.namelist()
    tops = {n.split('/')[0] for n in names}
    assert tops == {'timm_isomix', next(t for t in tops if t.endswith('.dist-info'))}, tops
    for module in ('bank.py', 'blocks.py', 'models/resnet.py', 'models/isometric.py', 'models/multitask.py',
                   'hub/publish.py', 'train/run.py', 'tasks/fit.py'):
        assert f'timm_isomix/{module}' in names, module
    assert any(n.startswith('timm_isomix/weights/') and n.endswith('model.safetensors') for n in names)
    assert not [n for n in names if 'experiments' in n or n.startswith('tests/') or 'results' in n]


def test_the_wheel_metadata_declares_lower_bounds_and_no_exact_pins(wheel):
    (meta,) = [n for n in wheel.namelist() if n.endswith('.dist-info/METADATA')]
    requires = [line.split(':', 1)[1].strip() for line in wheel.read(meta).decode().splitlines()
                if line.startswith('Requires-Dist:')]
    core = [r for r in requires if 'extra ==' not in r]
    assert {r.split('>=')[0] for r in core} >= {'torch', 'torchvision', 'timm', 'huggingface-hub', 'safetensors'}
    assert all('>=' in r for r in core), core
    assert not [r for r in requires if '==' in r.split(';')[0]], requires
    assert not [r for r in core if 'matplotlib' in r], 'matplotlib belongs in the plot extra'


def test_the_package_imports_and_builds_models_without_matplotlib_and_plots_name_the_extra():
    code = '''
import sys
sys.modules['matplotlib'] = None  # as if matplotlib were not installed
import timm, torch, timm_isomix
model = timm.create_model('isomix_iso_64_8_p2', num_classes=3)
assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
from timm_isomix.train.plots import plot_mixtures
try:
    plot_mixtures({'stage0': torch.rand(2, 2)}, 'unused.png')
except ImportError as e:
    print(e)
else:
    raise SystemExit('plotting without matplotlib did not fail')
'''
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pip install 'timm-isomix[plot]'" in proc.stdout
