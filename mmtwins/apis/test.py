"""``tools/test.py``: evaluate a checkpoint with any OpenMMLab 3.x config.

Scope-agnostic (the config's ``default_scope`` decides): ``--tta`` is OpenMMLab's standard swap
to the config's ``tta_model``/``tta_pipeline`` (mmdet's ``DetTTAModel``, mmseg's
``SegTTAModel``; for mmpretrain configs without them, mmpretrain's flip averaging), and
``--out`` saves predictions the way each codebase's own ``tools/test.py`` does: a pickle of
``DumpDetResults`` (mmdet), prediction maps in a directory through ``test_evaluator.output_dir``
(mmseg), a pickle of mmengine's ``DumpResults`` (others).
``--show``/``--show-dir``/``--wait-time`` (and mmpretrain's ``--interval``) turn on the config's
visualization hook as each codebase's ``tools/test.py`` does (:func:`trigger_visualization_hook`).
"""
import argparse
import copy
import logging
from typing import Optional, Sequence

from mmengine.config import Config
from mmengine.device import get_device
from mmengine.logging import print_log
from mmengine.runner import BaseLoop, Runner
from mmengine.utils import mkdir_or_exist

from mmtwins.cli import cli_errors
from mmtwins.engine import ConfigError
from .config import add_common_args, load_config, warn_if_cpu_amp_is_emulated
from .runner import build_runner, check_launcher, owned_process_group

PICKLE_SUFFIXES = ('.pkl', '.pickle')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and evaluate) a model of any OpenMMLab '
                                     '3.x scope')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='save predictions: a .pkl file (mmdet, mmpretrain) or a '
                        'directory of prediction maps (mmseg)')
    parser.add_argument('--tta', action='store_true',
                        help="test-time augmentation with the config's tta_model and tta_pipeline")
    parser.add_argument('--amp', action='store_true',
                        help='test under autocast (fp16 on a GPU, bf16 on a CPU)')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument('--show-dir', help='save painted images: mmdet to '
                        'WORK_DIR/TIMESTAMP/SHOW_DIR, mmseg to SHOW_DIR/vis_data/vis_image, '
                        'mmpretrain to SHOW_DIR')
    parser.add_argument('--wait-time', type=float, default=2,
                        help='display time of every window with --show (s)')
    parser.add_argument('--interval', type=int, default=None,
                        help='mmpretrain: visualize every INTERVAL-th sample (default 1); mmseg: '
                        "the hook's interval in test batches (the config's, 50, by default)")
    add_common_args(parser)
    return parser.parse_args(argv)


def _contains_key(node, key: str) -> bool:
    if isinstance(node, dict):
        return key in node or any(_contains_key(v, key) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_contains_key(v, key) for v in node)
    return False


def apply_tta(cfg: Config) -> None:
    """Swap ``cfg`` to test-time augmentation, as the config's scope's ``tools/test.py`` does.

    The test pipeline becomes ``cfg.tta_pipeline`` and the model is wrapped as
    ``cfg.tta_model`` (with ``module=cfg.model``). mmdet and mmpretrain configs without them
    get their tools' defaults (:func:`_default_det_tta`, :func:`_default_cls_tta`); mmseg
    configs need their own.
    """
    scope = cfg.get('default_scope')
    if scope == 'mmdet' and _contains_key(cfg.model, 'mask_head'):
        raise ConfigError('--tta: mmdet 3.x has no test-time augmentation for instance masks (its '
                          'DetTTAModel merges boxes only), so the Mask R-CNN configs define none. '
                          'Test without --tta; RetinaNet configs support it.')
    if scope == 'mmdet':
        _default_det_tta(cfg)
    elif scope == 'mmpretrain':
        _default_cls_tta(cfg)
    missing = [key for key in ('tta_model', 'tta_pipeline') if key not in cfg]
    if missing:
        raise ConfigError(f'--tta needs {" and ".join(missing)} in the config '
                          f'({cfg.filename or "given as a dict"}), which has none')
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    cfg.tta_model.module = cfg.model
    cfg.model = cfg.tta_model


def _default_det_tta(cfg: Config) -> None:
    """mmdet's ``tools/test.py`` default where the config has none, with its warnings: boxes of
    each image and of its horizontal flip merged by NMS at IoU 0.5 (``DetTTAModel``), the flips
    made before the last step of the innermost dataset's pipeline, ``PackDetInputs``."""
    if 'tta_model' not in cfg:
        print_log('--tta: the config has no tta_model; using mmdet\'s default (DetTTAModel, NMS '
                  'at IoU 0.5, 100 boxes per image)', logger='current', level=logging.WARNING)
        cfg.tta_model = dict(type='DetTTAModel',
                             tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
    if 'tta_pipeline' not in cfg:
        print_log("--tta: the config has no tta_pipeline; using mmdet's default (each image and "
                  'its horizontal flip)', logger='current', level=logging.WARNING)
        dataset = cfg.test_dataloader.dataset
        while 'dataset' in dataset:
            dataset = dataset['dataset']
        pipeline = copy.deepcopy(dataset.pipeline)
        pipeline[-1] = _flip_tta(dict(type='PackDetInputs', meta_keys=(
            'img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor', 'flip',
            'flip_direction')))
        cfg.tta_pipeline = pipeline


def _flip_tta(pack: dict) -> dict:
    """The pipeline step that makes each image and its horizontal flip, then packs both."""
    flips = [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)]
    return dict(type='TestTimeAug', transforms=[flips, [pack]])


def _default_cls_tta(cfg: Config) -> None:
    """mmpretrain's ``tools/test.py`` default where the config has none: the class scores of
    each image and of its horizontal flip, averaged (``AverageClsScoreTTA``), the flips made
    before the test pipeline's last step (``PackInputs``)."""
    if 'tta_model' not in cfg:
        cfg.tta_model = dict(type='mmpretrain.AverageClsScoreTTA')
    if 'tta_pipeline' not in cfg:
        pipeline = copy.deepcopy(cfg.test_dataloader.dataset.pipeline)
        pipeline[-1] = _flip_tta(pipeline[-1])
        cfg.tta_pipeline = pipeline


def _test_metrics(cfg: Config) -> list:
    evaluator = cfg.get('test_evaluator') or []
    return evaluator if isinstance(evaluator, list) else [evaluator]


def set_seg_output(cfg: Config, out_dir: str) -> None:
    """mmseg: write prediction maps to ``out_dir`` (as mmseg's ``tools/test.py --out``)."""
    for metric in _test_metrics(cfg):
        metric['output_dir'] = out_dir
        metric['keep_results'] = True


def make_output_dirs(cfg: Config) -> None:
    """Create the test metrics' ``output_dir`` (``--out`` or the config's) in every process.

    mmseg's ``IoUMetric`` creates it in the main process only, when that process builds it, so
    in a distributed test another process could write its first map before the folder exists
    (``FileNotFoundError``).
    """
    for metric in _test_metrics(cfg):
        if metric.get('output_dir'):
            mkdir_or_exist(metric['output_dir'])


def add_dump_metric(runner: Runner, scope: Optional[str], out_file: str) -> None:
    """mmdet / others: also dump every prediction to the pickle ``out_file``."""
    if scope == 'mmdet':
        from mmdet.evaluation import DumpDetResults as Dump
    else:
        from mmengine.evaluator import DumpResults as Dump
    runner.test_evaluator.metrics.append(Dump(out_file_path=out_file))


_VIS_HOOKS = {'mmdet': 'DetVisualizationHook', 'mmseg': 'SegVisualizationHook',
              'mmpretrain': 'VisualizationHook'}


def trigger_visualization_hook(cfg: Config, args: argparse.Namespace) -> None:
    """Turn on ``default_hooks.visualization`` for ``--show``/``--show-dir``, as the config's
    scope's own ``tools/test.py`` does.

    * mmdet: ``draw=True``; ``--show`` sets ``show`` and ``wait_time``; ``--show-dir`` is the
      hook's ``test_out_dir`` (images land in ``WORK_DIR/TIMESTAMP/SHOW_DIR/<image name>``).
    * mmseg: ``draw=True``; ``--show`` sets ``show`` and ``wait_time``; ``--show-dir`` is the
      visualizer's ``save_dir`` (images land in ``SHOW_DIR/vis_data/vis_image/``). The hook draws
      every ``interval``-th test batch (50 in mmseg's configs); ``--interval`` sets it.
    * mmpretrain: ``enable=True``, ``show``, ``wait_time``, ``out_dir`` and ``interval`` (default
      1) from the arguments (images land in ``SHOW_DIR/<image name>_0.png``).
    """
    scope = cfg.get('default_scope')
    if scope not in _VIS_HOOKS:
        raise ConfigError(f'--show/--show-dir support mmdet, mmseg and mmpretrain configs, not '
                          f'default_scope={scope!r}')
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        raise ConfigError('VisualizationHook must be included in default_hooks, e.g. '
                          f'"visualization=dict(type=\'{_VIS_HOOKS[scope]}\')" '
                          f'({cfg.filename or "config given as a dict"} has none)')
    if scope == 'mmpretrain':
        hook.update(enable=True, show=args.show, wait_time=args.wait_time,
                    out_dir=args.show_dir,
                    interval=1 if args.interval is None else args.interval)
        return
    if args.interval is not None and scope == 'mmdet':
        raise ConfigError("--interval: mmdet's visualization hook draws every test image")
    hook['draw'] = True
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if args.interval is not None:
        hook['interval'] = args.interval
    if args.show_dir:
        if scope == 'mmdet':
            hook['test_out_dir'] = args.show_dir
        elif 'visualizer' not in cfg:
            raise ConfigError('--show-dir: mmseg saves through the config\'s visualizer, and '
                              f'{cfg.filename or "the config"} defines none')
        else:
            cfg.visualizer['save_dir'] = args.show_dir


def build_test_cfg(args: argparse.Namespace) -> Config:
    """The test config of ``args``: ``load_config`` plus the checkpoint, ``--tta``, ``--amp``
    (the test loop's autocast), ``--show``/``--show-dir`` and, for mmseg configs, ``--out``."""
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        if args.tta and cfg.get('default_scope') == 'mmpretrain':
            raise ConfigError("--show/--show-dir with --tta: mmpretrain's visualization hook "
                              'draws the batch it is given as images, which under --tta is a '
                              'list of augmented views; paint the predictions without --tta')
        trigger_visualization_hook(cfg, args)
    if args.tta:
        apply_tta(cfg)
    if args.amp:
        if cfg.get('default_scope') == 'mmdet' and get_device() == 'cpu':
            raise ConfigError("--amp on a CPU autocasts to bf16, and mmcv's CPU NMS takes float32 "
                              'boxes only, so a detector fails in its post-processing: test '
                              'detectors on a CPU without --amp (with it on a GPU)')
        warn_if_cpu_amp_is_emulated()
        cfg.test_cfg = dict(cfg.get('test_cfg') or dict(type='TestLoop'), fp16=True)
    if args.out and cfg.get('default_scope') == 'mmseg':
        set_seg_output(cfg, args.out)
    elif args.out and not args.out.endswith(PICKLE_SUFFIXES):
        raise ConfigError(f'--out must name a .pkl/.pickle file for {cfg.get("default_scope")} '
                          f'configs, got {args.out}')
    return cfg


class NoTrainLoop(BaseLoop):
    """The train loop of a test run, at step 0. Hooks read ``runner.iter`` (mmseg's visualization
    hook draws with ``step=runner.iter``), which would otherwise build the config's train loop
    and with it the training dataset: slow for COCO or ADE20K, and an error where only the test
    images are there."""
    epoch = iter = max_epochs = max_iters = 0

    def __init__(self, runner: Runner):
        super().__init__(runner, dataloader=[])

    def run(self) -> None:
        raise RuntimeError('a test run does not train')


def run_test(cfg: Config, out: Optional[str] = None) -> dict:
    """Build the runner of ``cfg`` and run its test loop (``out``: mmdet's and mmpretrain's
    ``--out`` pickle); returns the metrics. The runner lives only in this call, so
    :func:`owned_process_group` around it can free it before it ends the process group."""
    scope = cfg.get('default_scope')
    runner = build_runner(cfg)
    runner._train_loop = NoTrainLoop(runner)  # Runner builds a loop given as a dict lazily
    if out and scope != 'mmseg':
        add_dump_metric(runner, scope, out)
    make_output_dirs(cfg)
    return runner.test()


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the test loop; returns the metrics. A refused config or option combination
    (:class:`~mmtwins.engine.ConfigError`) exits with its message as one line."""
    args = parse_args(argv)
    with cli_errors('test.py', (ConfigError, )):
        cfg = build_test_cfg(args)
        check_launcher(cfg)
    with owned_process_group():
        return run_test(cfg, args.out)
