"""The model zoo for mim: the metafiles, the files packed into ``mmtwins/.mim``, and mim itself."""
import glob
import os
import platform
import runpy
import shutil
import subprocess
import sys
import zipfile

import mmtwins
import pytest
import yaml
from imagefolder import make_imagefolder, tiny_classifier_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIM_DIR = os.path.join(os.path.dirname(os.path.abspath(mmtwins.__file__)), '.mim')


def _load(path):
    with open(os.path.join(ROOT, path)) as f:
        return yaml.safe_load(f)


def _metafiles():
    return {path: _load(path) for path in _load('model-index.yml')['Import']}


def _models():
    return [m for meta in _metafiles().values() for m in meta['Models']]


def test_every_config_is_in_the_zoo_and_every_zoo_config_exists():
    models = _models()
    names = [m['Name'] for m in models]
    assert len(names) == len(set(names)), 'model names must be unique'
    listed = {m['Config'] for m in models}
    missing = sorted(c for c in listed if not os.path.isfile(os.path.join(ROOT, c)))
    assert not missing, f'metafiles name configs that do not exist: {missing}'
    on_disk = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))}
    assert on_disk == listed, f'configs not in any metafile: {sorted(on_disk - listed)}'
    for m in models:
        assert m['Name'] == os.path.splitext(os.path.basename(m['Config']))[0]


@pytest.mark.parametrize('path', sorted(_load('model-index.yml')['Import']))
def test_metafile_is_consistent(path):
    meta = _load(path)
    collections = {c['Name'] for c in meta['Collections']}
    for m in meta['Models']:
        assert m['In Collection'] in collections, m['Name']
        for result in m.get('Results', []):
            assert result['Task'] and result['Dataset'], m['Name']
            assert all(0 < v < 100 for v in result['Metrics'].values()), m['Name']
        if 'Converted From' in m:
            assert m['Converted From']['Command'].startswith(
                'python -m mmtwins.classification.convert ')


def test_package_carries_configs_tools_and_model_index():
    for name in ('configs', 'tools', 'model-index.yml'):
        assert os.path.exists(os.path.join(MIM_DIR, name)), f'{name} missing from {MIM_DIR}'
    assert os.path.isfile(os.path.join(MIM_DIR, 'tools', 'train.py'))
    assert os.path.isfile(os.path.join(MIM_DIR, 'configs', 'twins_svt_s_in1k.py'))


def test_wheel_carries_every_config_and_tool_but_the_checkout_only_ones(tmp_path):
    """A wheel built from the tracked files (as pip builds one) holds each config, tool and the
    model index under mmtwins/.mim, listed one by one in setup.py (setuptools before 62.3 reads
    no ``**``), without the tools that need this repository, and on x86-64 Linux the compiled
    kernels (``mmtwins._ext``)."""
    tracked = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split('\0')
    src = tmp_path / 'src'
    for path in filter(None, tracked):
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, path), src / path)
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps',
                    '--no-build-isolation', '-w', str(tmp_path / 'dist'), str(src)],
                   check=True, capture_output=True)
    wheel, = (tmp_path / 'dist').glob('mmtwins-*.whl')
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    packed = {n[len('mmtwins/.mim/'):] for n in names if n.startswith('mmtwins/.mim/')}
    setup = runpy.run_path(str(src / 'setup.py'), run_name='setup')  # its helpers, no build
    expected = {p for p in tracked
                if p.startswith(('configs/', 'tools/')) or p == 'model-index.yml'}
    assert packed == expected - set(setup['CHECKOUT_ONLY'])
    assert {'tools/train.py', 'tools/dist_train.sh', 'tools/launch_python.sh',
            'configs/_base_/segmentation/ade20k.py',
            'configs/demo/fpn_twins_svt_toy.py'} <= packed
    assert 'tools/setup_env.sh' not in packed
    if platform.machine().lower() in ('x86_64', 'amd64') and sys.platform.startswith('linux'):
        assert any(n.startswith('mmtwins/_ext.') and n.endswith('.so') for n in names)


def _mim(*args, cwd=ROOT):
    proc = subprocess.run([sys.executable, '-m', 'mim', *args], capture_output=True, text=True,
                          cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_mim_search_lists_every_model():
    out = _mim('search', 'mmtwins')
    for name in (m['Name'] for m in _models()):
        assert name in out
    one = _mim('search', 'mmtwins', '--model', 'twins-svt', '--field', 'top_1_accuracy')
    assert 'twins_svt_b_in1k' in one and 'twins_pcpvt_b_in1k' not in one


def test_mim_train_then_test(tmp_path):
    """``mim train mmtwins CONFIG`` / ``mim test mmtwins CONFIG --checkpoint`` run the packed
    tools; outside the repository, so nothing is found through the working directory."""
    data = make_imagefolder(str(tmp_path / 'data'), num_classes=3, per_class=(4, 2))
    work = tmp_path / 'work'
    cfg = tiny_classifier_config(data, work)
    config = str(tmp_path / 'tiny_twins_svt_in1k.py')
    cfg.dump(config)
    out = _mim('train', 'mmtwins', config, '--work-dir', str(work), cwd=tmp_path)
    assert os.path.isfile(work / 'epoch_1.pth'), out
    out = _mim('test', 'mmtwins', config, '--checkpoint', str(work / 'epoch_1.pth'), '--work-dir',
               str(work), cwd=tmp_path)
    assert 'accuracy/top1' in out
