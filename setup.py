"""mmtwins: ``pip install -e .`` / ``mim install -e .``.

The mim extension (as mmdet and mmseg do it) packs ``configs/``, ``tools/`` and
``model-index.yml`` into ``mmtwins/.mim``: symbolic links for an editable install, copies when a
wheel or sdist is built. ``mim search mmtwins``, ``mim train mmtwins CONFIG`` and
``mim test mmtwins CONFIG --checkpoint CKPT`` read them from there.
"""
import os
import os.path as osp
import platform
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = osp.dirname(osp.abspath(__file__))
MIM_FILES = ('configs', 'tools', 'model-index.yml')
# Tools that need this repository (its requirements/, its git history, a dev machine) and cannot
# run from an installed package: left out of it.
CHECKOUT_ONLY = ('tools/setup_env.sh', 'tools/misc/offline_stack.sh', 'tools/misc/gpu_checks.sh',
                 'tools/analysis_tools/revision_ab.py')


def read_version() -> str:
    with open(osp.join(ROOT, 'mmtwins', 'version.py')) as f:
        return re.search(r"__version__\s*=\s*'([^']+)'", f.read()).group(1)


def read_requirements(path: str) -> list:
    """Requirement lines of a requirements file (comments, blanks and ``-r``/``-c`` skipped)."""
    with open(osp.join(ROOT, path)) as f:
        lines = (line.split('#', 1)[0].strip() for line in f)
        return [line for line in lines if line and not line.startswith('-')]


def add_mim_extension() -> None:
    """Link (editable install) or copy (wheel, sdist) the mim files into ``mmtwins/.mim``."""
    if {'develop', 'editable_wheel'} & set(sys.argv):
        mode = 'symlink'
    elif {'sdist', 'bdist_wheel', 'install', 'build'} & set(sys.argv):
        mode = 'copy'
    else:
        return
    mim_path = osp.join(ROOT, 'mmtwins', '.mim')
    os.makedirs(mim_path, exist_ok=True)
    for name in MIM_FILES:
        src, dst = osp.join(ROOT, name), osp.join(mim_path, name)
        if not osp.exists(src):
            continue
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        if mode == 'symlink':
            os.symlink(osp.relpath(src, mim_path), dst)
        elif osp.isdir(src):
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
        else:
            shutil.copyfile(src, dst)


def native_extension() -> dict:
    """``setup()``'s arguments for ``mmtwins._ext``, the compiled CPU kernels (``mmtwins/csrc``),
    on x86-64 Linux where torch is importable at build time (pip's ``setup.py`` path or
    ``--no-build-isolation``, as ``tools/setup_env.sh`` installs); elsewhere none. A build that
    fails (no C++ compiler, GCC before 10) installs the package without them, with a warning:
    mmtwins runs without them (:mod:`mmtwins.models.layers.native`: PyTorch computes the same).
    """
    if platform.machine().lower() not in ('x86_64', 'amd64') or not sys.platform.startswith(
            'linux'):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # build isolation: no torch to compile against
        return {}

    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):

        def run(self):
            try:
                super().run()
            except Exception as e:  # torch's ninja build raises RuntimeError, not CompileError
                print(f'WARNING: mmtwins: the CPU kernels mmtwins._ext were not built ({e}); '
                      "CPU attention and bf16 LayerNorm will run in PyTorch's (slower)",
                      file=sys.stderr)

    # at::parallel_for is inlined into the extension: its threads need OpenMP, as PyTorch's Linux
    # wheels are built with (their libgomp.so.1 is then the one loaded)
    sources = [f'mmtwins/csrc/{name}.cpp' for name in ('ext', 'attention', 'gelu', 'layer_norm')]
    return dict(ext_modules=[CppExtension('mmtwins._ext', sources,
                                          extra_compile_args=['-O3', '-fopenmp'],
                                          extra_link_args=['-fopenmp'])],
                cmdclass={'build_ext': OptionalBuildExtension})


def mim_package_data() -> list:
    """The files of ``mmtwins/.mim`` (configs, tools, model index) one by one, as paths from
    ``mmtwins/``: setuptools before 62.3 reads no recursive ``**`` in ``package_data``."""
    package = osp.join(ROOT, 'mmtwins')
    files = []
    for dirpath, dirnames, names in os.walk(osp.join(package, '.mim'), followlinks=True):
        dirnames[:] = [d for d in dirnames if d != '__pycache__']
        for name in names:
            path = osp.relpath(osp.join(dirpath, name), package)
            if (name.endswith(('.py', '.yml', '.sh'))
                    and osp.relpath(path, '.mim') not in CHECKOUT_ONLY):
                files.append(path)
    return sorted(files)


if __name__ == '__main__':
    add_mim_extension()
    setup(
        name='mmtwins',
        version=read_version(),
        description='Twins-PCPVT and Twins-SVT backbones for OpenMMLab 3.x '
        '(mmdet, mmsegmentation, mmpretrain)',
        python_requires='>=3.10',  # torch 2.7 and later
        packages=find_packages(include=['mmtwins', 'mmtwins.*']),
        package_data={'mmtwins': mim_package_data()},
        install_requires=read_requirements('requirements/runtime.txt'),
        extras_require={
            'deploy': read_requirements('requirements/deploy.txt'),
            'tests': (read_requirements('requirements/tests.txt')
                      + read_requirements('requirements/deploy.txt')),
        },
        zip_safe=False,
        **native_extension())
