"""Check a config before any model or dataset is built, with errors that say how to fix it.

MMEngine reports an unknown registry name or argument, a missing data directory, a broken
annotation file or a missing pretrained checkpoint only when it builds or initialises the object,
with a message that names neither the config key nor a fix. :func:`preflight_check` finds these
first and raises one :class:`ConfigError` listing every problem, each with its config key and,
where one exists, a suggestion::

    model.backbone.type: 'mmtwins.SVTT' is not a registered model; did you mean 'mmtwins.SVT'?
    train_dataloader.dataset.data_root: directory 'data/ade' does not exist; ...
"""
import difflib
import inspect
import json
import os.path as osp
import re
from typing import Iterator, List, Optional, Sequence, Set, Tuple

from mmengine.config import Config
from mmengine.registry import MODELS, Registry, init_default_scope

MODEL_PARTS = ('backbone', 'neck', 'decode_head', 'auxiliary_head', 'bbox_head', 'rpn_head',
               'roi_head', 'head', 'data_preprocessor')
DATALOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
# Annotation files up to this size are parsed here; larger ones when the dataset loads them.
MAX_JSON_CHECK_BYTES = 64 * 2**20
COCO_KEYS = ('images', 'annotations', 'categories')
# Dataset types that read COCO's object (mmdet's CocoDataset, CocoPanopticDataset and their
# subclasses); COCO caption, retrieval and VQA datasets read JSON lists.
_COCO_INSTANCES = re.compile(r'coco(panoptic)?dataset$', re.IGNORECASE)


class ConfigError(ValueError):
    """A config that would fail once the runner builds it, found beforehand."""


def preflight_check(cfg: Config, dataloaders: Sequence[str] = DATALOADERS) -> None:
    """Check ``cfg``'s model (registered types, arguments, ``arch`` names, ``Pretrained``
    checkpoint files) and the data of the ``dataloaders`` named (directories, annotation files;
    :func:`train_dataloaders` for a training run).

    Raises:
        ConfigError: listing every problem found, each with its config key.
    """
    problems = check_model(cfg) + check_data(cfg, dataloaders)
    if len(problems) == 1:
        raise ConfigError(f'{problems[0]} (config {cfg.filename})')
    if problems:
        listed = '\n'.join(f'  - {p}' for p in problems)
        raise ConfigError(f'config {cfg.filename} has {len(problems)} problems:\n{listed}')


# --------------------------------------------------------------------------- model
def check_model(cfg: Config) -> List[str]:
    """Problems of ``cfg.model`` and its top-level parts (:data:`MODEL_PARTS`)."""
    model = cfg.get('model')
    if model is None:
        return ['model: the config defines no model']
    init_default_scope(cfg.get('default_scope') or 'mmengine')
    problems = _check_component('model', model)
    for part in MODEL_PARTS:
        sub = model.get(part)
        for i, comp in enumerate(sub if isinstance(sub, (list, tuple)) else [sub]):
            key = f'model.{part}' + (f'[{i}]' if isinstance(sub, (list, tuple)) else '')
            if isinstance(comp, dict) and 'type' in comp:
                problems += _check_component(key, comp) + _check_pretrained(key, comp)
    return problems + _check_model_pretrained(model)


def _check_model_pretrained(model: dict) -> List[str]:
    """mmseg's segmentors hand ``model.pretrained`` to the backbone as ``pretrained=``, which a
    backbone without that argument (mmtwins') refuses when it is built."""
    backbone = model.get('backbone')
    if (model.get('pretrained') is None or not isinstance(backbone, dict)
            or not isinstance(backbone.get('type'), str)):
        return []
    cls = _lookup(backbone['type'])[0]
    accepted = None if cls is None else _accepted_args(cls)
    if accepted is None or 'pretrained' in accepted:
        return []
    return [f"model.pretrained: {cls.__name__} has no 'pretrained' argument, to which mmseg "
            "passes it; load the weights with model.backbone.init_cfg=dict(type='Pretrained', "
            f"checkpoint={model['pretrained']!r}) and set model.pretrained=None"]


def _check_pretrained(key: str, comp: dict) -> List[str]:
    """A ``Pretrained`` initialiser whose checkpoint is a local path with no file: training
    would stop at ``init_weights``, after the data and the optimizer are built."""
    init_cfg = comp.get('init_cfg')
    listed = isinstance(init_cfg, (list, tuple))
    problems = []
    for i, init in enumerate(init_cfg if listed else [init_cfg]):
        if not (isinstance(init, dict) and init.get('type') == 'Pretrained'):
            continue
        path = init.get('checkpoint')
        if isinstance(path, str) and '://' not in path and not osp.isfile(path):
            sub = f'{key}.init_cfg' + (f'[{i}]' if listed else '')
            problems.append(
                f'{sub}.checkpoint: file {path!r} does not exist (point it at the weights with '
                f'--cfg-options {sub}.checkpoint=PATH, or train from scratch with --cfg-options '
                f"{sub}=None; mmtwins' configs name the ImageNet weights in "
                'configs/_base_/twins_imagenet.py)')
    return problems


def _check_component(key: str, comp: dict) -> List[str]:
    obj_type = comp.get('type')
    if not isinstance(obj_type, str):
        return []  # a class object given directly: nothing to look up
    cls, registry = _lookup(obj_type)
    if cls is None:
        hint = _did_you_mean(obj_type, _registered_names(registry))
        return [f'{key}.type: {obj_type!r} is not a registered model in scope '
                f'{registry.scope!r}{hint or "."} If it comes from a plugin, add the plugin to '
                "custom_imports=dict(imports=[...])"]
    problems = []
    accepted = _accepted_args(cls)
    if accepted is not None:
        for arg in sorted(set(comp) - accepted - {'type', '_scope_'}):
            hint = _did_you_mean(arg, accepted)
            problems.append(f'{key}.{arg}: {cls.__name__} has no argument {arg!r}{hint}')
    zoo = getattr(cls, 'arch_zoo', None)
    arch = comp.get('arch')
    if isinstance(zoo, dict) and isinstance(arch, str) and arch.lower() not in zoo:
        hint = _did_you_mean(arch.lower(), zoo)
        problems.append(f'{key}.arch: {cls.__name__} has no arch {arch!r}{hint} (choose one '
                        f'of {sorted(zoo)} or give a dict of custom settings)')
    return problems


def _lookup(obj_type: str) -> Tuple[Optional[type], Registry]:
    """The class registered as ``obj_type`` in the default scope's model registry (None if none)
    and that registry."""
    with MODELS.switch_scope_and_registry(None) as registry:
        return registry.get(obj_type), registry


def _accepted_args(cls) -> Optional[Set[str]]:
    """Keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up the MRO; None when
    they cannot be known (a ``**kwargs`` that reaches no explicit signature)."""
    if not inspect.isclass(cls):
        params = inspect.signature(cls).parameters.values()
        return None if any(p.kind is p.VAR_KEYWORD for p in params) else {p.name for p in params}
    names: Set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get('__init__')
        if init is None:
            continue
        if klass is object:
            return names
        params = list(inspect.signature(init).parameters.values())[1:]
        names.update(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def _registered_names(registry: Registry) -> Set[str]:
    """Names reachable from ``registry``: its own, its ancestors', and every scope's prefixed."""
    names: Set[str] = set()
    node = registry
    while node is not None:
        names.update(node.module_dict)
        root = node
        node = node.parent
    for scope, child in root.children.items():
        names.update(f'{scope}.{name}' for name in child.module_dict)
    return names


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f'; did you mean {close[0]!r}?' if close else ''


# --------------------------------------------------------------------------- data
def train_dataloaders(cfg: Config) -> Tuple[str, ...]:
    """The dataloaders ``Runner.train()`` builds: the training one, and the validation one where
    ``val_cfg`` turns validation on; not the test one (a test set not yet downloaded, such as
    COCO test-dev, does not stop mmdet's or mmseg's training either)."""
    validates = cfg.get('val_cfg') is not None  # as the Runner decides: an empty dict validates
    return ('train_dataloader', ) + (('val_dataloader', ) if validates else ())


def check_data(cfg: Config, dataloaders: Sequence[str] = DATALOADERS) -> List[str]:
    """Problems of the datasets of ``cfg``'s ``dataloaders``: missing ``data_root``,
    ``data_prefix`` directories or ``ann_file``; unparsable JSON annotations, or, for COCO
    detection datasets, JSON without the COCO keys."""
    problems = []
    for loader in dataloaders:
        loader_cfg = cfg.get(loader)
        if isinstance(loader_cfg, dict) and isinstance(loader_cfg.get('dataset'), dict):
            for key, dataset in _leaf_datasets(f'{loader}.dataset', loader_cfg['dataset']):
                problems += _check_dataset(key, dataset)
    return problems


def _leaf_datasets(key: str, dataset: dict) -> Iterator[Tuple[str, dict]]:
    """The datasets inside wrappers (``RepeatDataset``, ``ConcatDataset``, ...)."""
    if isinstance(dataset.get('dataset'), dict):
        yield from _leaf_datasets(f'{key}.dataset', dataset['dataset'])
    elif isinstance(dataset.get('datasets'), (list, tuple)):
        for i, d in enumerate(dataset['datasets']):
            yield from _leaf_datasets(f'{key}.datasets[{i}]', d)
    else:
        yield key, dataset


def _check_dataset(key: str, dataset: dict) -> List[str]:
    root = dataset.get('data_root') or ''
    if '://' in str(root):
        return []  # a remote backend: checked when it is read
    fix = f' (set it in the config or with --cfg-options {key}.data_root=/path/to/data)'
    if root and not osp.isdir(root):
        return [f'{key}.data_root: directory {root!r} does not exist{fix}']
    problems = []
    prefix = dataset.get('data_prefix') or {}
    prefixes = prefix.items() if isinstance(prefix, dict) else [('', prefix)]
    for name, sub in prefixes:
        if isinstance(sub, str) and sub and '://' not in sub:
            path = osp.join(root, sub)
            if not osp.isdir(path):
                field = f'data_prefix.{name}' if name else 'data_prefix'
                problems.append(f'{key}.{field}: directory {path!r} does not exist')
    ann = dataset.get('ann_file')
    if isinstance(ann, str) and ann and '://' not in ann:
        path = osp.join(root, ann)
        if not osp.isfile(path):
            problems.append(f'{key}.ann_file: file {path!r} does not exist')
        elif path.endswith('.json') and osp.getsize(path) <= MAX_JSON_CHECK_BYTES:
            problems += _check_json(key, path, str(dataset.get('type', '')))
    return problems


def _check_json(key: str, path: str, dataset_type: str) -> List[str]:
    try:
        with open(path, encoding='utf-8') as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        return [f'{key}.ann_file: {path!r} is not valid JSON: {e.msg} at line {e.lineno} '
                f'column {e.colno}']
    except UnicodeDecodeError as e:
        return [f'{key}.ann_file: {path!r} is not UTF-8 text ({e.reason} at byte {e.start})']
    except OSError as e:
        return [f'{key}.ann_file: cannot read {path!r}: {e.strerror or e}']
    if _COCO_INSTANCES.search(dataset_type.split('.')[-1]):
        if not isinstance(content, dict):
            return [f'{key}.ann_file: {path!r} holds a JSON {type(content).__name__}, not the '
                    f'COCO object with keys {list(COCO_KEYS)}']
        missing = [k for k in COCO_KEYS if k not in content]
        if missing:
            return [f'{key}.ann_file: {path!r} lacks the COCO key(s) {missing}']
    return []
