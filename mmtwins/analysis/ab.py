"""A/B timing of one model's step under alternative code paths, in one process.

Each arm is a context manager factory that switches the model to one path (patching a forward,
restricting a kernel backend). The arms take turns step by step, in alternating order, so drift
in the machine's speed (shared hosts, clocks, heap state) falls on every arm alike, which
separate runs cannot promise. Used by ``tools/analysis_tools/revision_ab.py``, ``build_ab.py``,
``mlp_ab.py`` and ``sdpa_ab.py``.
"""
import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import re
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Callable, ContextManager, Dict, List, Optional, Sequence

import torch
from torch import nn

from .peers import CHECKOUT, add_variants_argument, build_impl, make_step

Arms = Dict[str, Callable[[], ContextManager]]

_RELATIVE_IMPORT = re.compile(r'^(\s*)from (\.+)([\w.]*) import', re.MULTILINE)
_REGISTRATION = re.compile(r'^\s*@\w+\.register_module\(.*\)\s*$', re.MULTILINE)
_MISSING = object()


def patched(owner, name: str, value) -> Callable[[], ContextManager]:
    """An arm that sets ``owner.name`` to ``value`` inside its context and restores it after."""

    @contextlib.contextmanager
    def arm():
        # From the owner's own namespace: a static or class method stays one when restored,
        # and an inherited attribute is removed again rather than copied onto the owner.
        old = vars(owner).get(name, _MISSING)
        setattr(owner, name, value)
        try:
            yield
        finally:
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)

    return arm


def _source_at(rev: str, path: str, repo: Path) -> str:
    """The source of ``path`` at ``rev``, its relative imports made absolute and its registry
    decorators dropped."""
    src = subprocess.run(['git', 'show', f'{rev}:{path}'], cwd=repo, check=True,
                         capture_output=True, text=True).stdout
    package = _module_name(path).split('.')[:-1]

    def absolute(m):
        base = package[:len(package) - len(m.group(2)) + 1]
        return f"{m.group(1)}from {'.'.join(base + ([m.group(3)] if m.group(3) else []))} import"

    return _REGISTRATION.sub('', _RELATIVE_IMPORT.sub(absolute, src))


def missing_at(rev: str, paths: Sequence[str], repo: Path = CHECKOUT) -> List[str]:
    """Those of ``paths`` that git revision ``rev`` of ``repo`` does not have.

    Raises:
        ValueError: ``rev`` is not a revision of ``repo``; the message is git's.
    """

    def cat_file(spec: str) -> subprocess.CompletedProcess:
        return subprocess.run(['git', 'cat-file', '-e', spec], cwd=repo, capture_output=True,
                              text=True)

    root = cat_file(f'{rev}:')  # the revision's tree
    if root.returncode:
        raise ValueError(root.stderr.strip())
    return [p for p in paths if cat_file(f'{rev}:{p}').returncode]


def _module_name(path: str) -> str:
    return path[:-len('.py')].replace('/', '.')


@contextlib.contextmanager
def _in_sys_modules(modules: Dict[str, types.ModuleType]):
    """``sys.modules`` with ``modules`` under their names, restored after."""
    saved = {name: sys.modules.get(name, _MISSING) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is _MISSING:
                del sys.modules[name]
            else:
                sys.modules[name] = old


def module_at(rev: str, path: str, repo: Path = CHECKOUT,
              imports: Optional[Dict[str, types.ModuleType]] = None) -> types.ModuleType:
    """The module ``path`` (e.g. ``'mmtwins/models/layers/mlp.py'``) as it is at git revision
    ``rev`` of ``repo`` (this checkout by default), loaded apart from the package: its imports
    resolve to the working tree's modules, except those named in ``imports`` (module name ->
    module, e.g. other modules of the revision), and its registry decorators are dropped (the
    working tree's classes stay registered).

    Raises:
        subprocess.CalledProcessError: ``rev`` or ``path`` unknown to git.
    """
    return _exec_module(rev, path, _source_at(rev, path, repo), imports or {})


def _exec_module(rev: str, path: str, src: str,
                 imports: Dict[str, types.ModuleType]) -> types.ModuleType:
    """``src`` (``path`` at ``rev``, from :func:`_source_at`) run as a module of its own."""
    module = types.ModuleType(f'{_module_name(path)}_at_{re.sub(r"[^0-9A-Za-z]", "_", rev)}')
    module.__file__ = f'{rev}:{path}'
    with _in_sys_modules(imports):
        exec(compile(src, module.__file__, 'exec'), module.__dict__)
    return module


def modules_at(rev: str, paths: Sequence[str],
               repo: Path = CHECKOUT) -> Dict[str, types.ModuleType]:
    """The modules ``paths`` at ``rev`` (module name -> module, as in :func:`module_at`), each
    loaded after those of ``paths`` it imports, which then resolve to the revision's: a helper
    whose signature changed since is called as the revision calls it."""
    names = {_module_name(p): p for p in paths}
    sources = {name: _source_at(rev, path, repo) for name, path in names.items()}
    deps = {name: set(re.findall(r'^\s*from ([\w.]+) import', src, re.MULTILINE))
            & set(names) - {name} for name, src in sources.items()}
    loaded: Dict[str, types.ModuleType] = {}

    def load(name: str, chain: tuple) -> None:
        if name in chain:
            raise ValueError(f'modules importing each other at {rev}: {" -> ".join(chain)}')
        if name not in loaded:
            for dep in sorted(deps[name]):
                load(dep, chain + (name, ))
            loaded[name] = _exec_module(rev, names[name], sources[name], dict(loaded))

    for name in names:
        load(name, ())
    return loaded


def _rebound(fn, cls: type):
    """``fn`` with zero-argument ``super()`` bound to ``cls``, the working tree's class it is
    swapped into (a revision's method would look its own class up, of which the model is no
    instance); static and class methods stay what they are."""
    if isinstance(fn, (staticmethod, classmethod)):
        return type(fn)(_rebound(fn.__func__, cls))
    if '__class__' not in fn.__code__.co_freevars:
        return fn
    cells = tuple(types.CellType(cls) if var == '__class__' else cell
                  for var, cell in zip(fn.__code__.co_freevars, fn.__closure__))
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def revision_arm(rev: str, paths: Sequence[str],
                 repo: Path = CHECKOUT) -> Callable[[], ContextManager]:
    """An arm that runs the code of ``paths`` as it is at git revision ``rev`` (of ``repo``, as
    in :func:`modules_at`).

    Every ``nn.Module`` class of those modules that the working tree also has gets the
    revision's methods (all but ``__init__``: the model is built once, by the working tree), and
    they run with the revision's module globals, so the functions and autograd functions they
    call are the revision's too, from whichever of ``paths`` they come.
    """
    swaps = []
    for name, old in modules_at(rev, paths, repo).items():
        current = importlib.import_module(name)
        for cls_name, cls in vars(old).items():
            target = getattr(current, cls_name, None)
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)
                    and cls.__module__ == old.__name__ and isinstance(target, type)):
                continue
            swaps += [patched(target, attr, _rebound(fn, target))
                      for attr, fn in vars(cls).items() if attr != '__init__'
                      and isinstance(fn, (types.FunctionType, staticmethod, classmethod))]

    return combined(swaps)


def load_extension(path) -> types.ModuleType:
    """Another build of mmtwins' compiled kernels: ``path`` a ``_ext*.so`` file or the folder
    holding one (the ``mmtwins/`` of a clone built with ``python setup.py build_ext --inplace``),
    loaded beside this checkout's ``mmtwins._ext`` under a package name of its own (for a second
    file of a module name it has loaded, Python hands back the first module).

    Raises:
        FileNotFoundError: no ``_ext*.so`` there.
        ImportError: the file is not a loadable build (another Python or torch, say).
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob('_ext*.so'))
        if not found:
            raise FileNotFoundError(f'no compiled _ext*.so in {path}')
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(f'no such file: {path}')
    package = 'mmtwins_build_' + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(f'{package}._ext', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_arm(module: types.ModuleType) -> Callable[[], ContextManager]:
    """An arm in which every mmtwins module that calls the compiled kernels by its ``_ext`` name
    calls ``module``'s instead (:func:`load_extension`); the Python code stays this checkout's."""
    from mmtwins.models.layers import native
    if native._ext is None:
        raise ValueError('this checkout has no compiled kernels (mmtwins._ext) to swap')
    users = [m for name, m in list(sys.modules.items())
             if name.startswith('mmtwins.') and getattr(m, '_ext', None) is native._ext]
    return combined([patched(m, '_ext', module) for m in users])


def combined(arms: Sequence[Callable[[], ContextManager]]) -> Callable[[], ContextManager]:
    """One arm that enters all of ``arms`` (and leaves them in reverse order)."""

    @contextlib.contextmanager
    def arm():
        with contextlib.ExitStack() as stack:
            for a in arms:
                stack.enter_context(a())
            yield

    return arm


def alternate(step: Callable[[], None], arms: Arms, steps: int, device: torch.device,
              warmup: int = 5) -> Dict[str, dict]:
    """Run ``step`` ``steps`` times under each arm, alternating; the first ``warmup`` untimed.

    Returns ``{arm: {'median_ms', 'min_ms', 'ratio', 'peak_mb'}}``. ``ratio`` is the median
    over the timed rounds of the arm's time over the first arm's in the same round (the pairs
    the alternation makes; 1 for the first arm). ``peak_mb`` is the rise of the allocated
    memory above its level at the start of the arm's first step, to its peak in that step, on
    a GPU (as ``compare_peers`` counts it: weights and input left out); None on a CPU, whose
    peak RSS one process cannot attribute to an arm.
    """
    if steps <= warmup:
        raise ValueError(f'steps ({steps}) must exceed warmup ({warmup})')
    cuda = device.type == 'cuda'
    times: Dict[str, List[float]] = {name: [] for name in arms}
    peak: Dict[str, float] = {}
    for i in range(steps):
        for name in list(arms)[::1 if i % 2 else -1]:
            with arms[name]():
                if cuda:
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                start = time.perf_counter()
                step()
                if cuda:
                    torch.cuda.synchronize(device)
                    peak.setdefault(name,
                                    (torch.cuda.max_memory_allocated(device) - base) / 2**20)
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    first = times[next(iter(arms))]
    return {name: dict(median_ms=statistics.median(t), min_ms=min(t),
                       ratio=statistics.median(a / b for a, b in zip(t, first)),
                       peak_mb=peak.get(name))
            for name, t in times.items()}


def format_arms(results: Dict[str, dict]) -> str:
    """``a 12.3 ms (min 11.9, first-step peak rise 980 MB), b 12.9 ms (min 12.4, 1.05x a's
    time in paired steps, first-step peak rise 1010 MB)``"""
    first = next(iter(results))
    return ', '.join(
        f'{n} {r["median_ms"]:.1f} ms (min {r["min_ms"]:.1f}'
        + (f', {r["ratio"]:.2f}x {first}\'s time in paired steps' if n != first else '')
        + (f', first-step peak rise {r["peak_mb"]:.0f} MB)' if r['peak_mb'] is not None else ')')
        for n, r in results.items())


def add_step_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of :func:`run_variants`: which step, where, how many times."""
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--size', type=int, default=512, help='input side')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--mode', choices=['train', 'infer'], default='train')
    parser.add_argument('--amp', action='store_true', help='autocast (fp16 on GPU, bf16 on CPU)')
    parser.add_argument('--steps', type=int, default=25, help='steps of each, the first 5 untimed')
    add_variants_argument(parser)
    return parser


def run_variants(args: argparse.Namespace, arms: Arms, log=print) -> None:
    """:func:`alternate` the ``arms`` on the step of each of ``args.variants`` (``family-arch``,
    as :func:`add_step_args` parses them; mmtwins' own model) and log one line per variant."""
    dev = torch.device(args.device)
    for variant in args.variants:
        family, arch = variant.split('-')
        torch.manual_seed(0)
        model = build_impl('mmtwins', family, arch).to(dev)
        x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
        res = alternate(make_step(model, x, args.mode, amp=args.amp), arms, args.steps, dev)
        log(f'{family}-{arch} {args.mode} {"x".join(map(str, x.shape))} '
            f'{"amp" if args.amp else "fp32"} {args.device}: {format_arms(res)}')
