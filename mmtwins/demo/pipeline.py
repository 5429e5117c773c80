"""The main job (``make demo``, ``tools/demo.py``): a Twins detector and segmentor end to end.

On a machine without COCO, ADE20K, GPU or pretrained weights:

1. writes the toy data set (:mod:`mmtwins.demo.toy_data`) in the COCO and ADE20K layouts;
2. trains RetinaNet + Twins-SVT (``configs/demo/retinanet_twins_svt_toy.py``) and Semantic FPN +
   Twins-SVT (``configs/demo/fpn_twins_svt_toy.py``) with ``tools/train.py``, the tool of the full
   experiments, each in its own process;
3. evaluates both on the held-out split with ``tools/test.py``: COCO box AP, and mIoU single-scale
   and with ``--tta``;
4. draws the predictions on a few held-out images with ``tools/infer.py`` (mmdet's and mmseg's
   inferencers) and plots the loss, learning-rate and metric curves of both trainings;
5. prints a summary table and writes everything under one folder::

       OUT_DIR/data/              the toy data set (COCO and ADE20K layouts; --data-dir)
       OUT_DIR/metrics.json       every metric, the data and schedule, each command and its time
       OUT_DIR/summary.md         the summary table
       OUT_DIR/det/, OUT_DIR/seg/ the training work dirs (checkpoints, logs, the config used)
       OUT_DIR/det/test/          test log and raw predictions (predictions.pkl)
       OUT_DIR/seg/test/          test log and the predicted maps of the held-out images (PNG)
       OUT_DIR/seg/test_tta/      test log with --tta
       OUT_DIR/vis/det/, OUT_DIR/vis/seg/   vis/NAME.png (drawn) and pred/NAME.json|png (raw)
       OUT_DIR/curves/det/, OUT_DIR/curves/seg/   loss.png, lr.png and coco_bbox_mAP.png|mIoU.png

Every command is printed before it runs and can be re-run by hand.
"""
import argparse
import json
import math
import os
import os.path as osp
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from mmtwins.analysis import plot_logs
from mmtwins.cli import at_least
from mmtwins.engine.fileio import atomic_write
from .toy_data import COCO_ANN_FILE, COCO_IMG_DIR, make_toy_data, toy_data_paths

DET_CONFIG = 'configs/demo/retinanet_twins_svt_toy.py'
SEG_CONFIG = 'configs/demo/fpn_twins_svt_toy.py'
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
DET_METRIC, SEG_METRIC = 'coco/bbox_mAP', 'mIoU'
NUM_STEPS = 9  # data; train, test (det); train, test, test --tta (seg); draw det, seg; curves
#: What a run writes under OUT_DIR after its evaluations, removed at the start of the next run.
PREVIOUS_OUTPUTS = ('summary.md', 'vis', 'curves', 'det/test/predictions.pkl',
                    'seg/test/pred_maps')


PACKAGE = Path(__file__).resolve().parents[1]


def source_checkout() -> Optional[Path]:
    """The repository this mmtwins is imported from, or None for an installed package (whose
    parent directory is site-packages)."""
    root = PACKAGE.parent
    return root if (root / 'setup.py').is_file() and (root / 'configs').is_dir() else None


def project_file(relpath: str) -> str:
    """A file of the project's ``configs/`` or ``tools/``: from the source checkout, else from
    the installed package's ``mmtwins/.mim`` copy."""
    root = source_checkout() or PACKAGE / '.mim'
    if (root / relpath).is_file():
        return str(root / relpath)
    raise FileNotFoundError(f'{relpath} is not in {root}')


@dataclass
class DemoOptions:
    """What the demo does. ``det_options``/``seg_options``: ``KEY=VALUE`` config overrides for
    every run of the detector/segmentor (``--cfg-options`` of the tools)."""
    out_dir: str = 'work_dirs/demo'
    data_dir: Optional[str] = None  # default: OUT_DIR/data
    num_train: int = 400
    num_val: int = 100
    seed: int = 0
    det_options: List[str] = field(default_factory=list)
    seg_options: List[str] = field(default_factory=list)
    num_vis: int = 4


class Demo:
    """Runs the steps of the module doc and records their commands and times."""

    def __init__(self, opts: DemoOptions):
        self.opts = opts
        self.out_dir = osp.abspath(opts.out_dir)
        self.data_dir = osp.abspath(opts.data_dir or osp.join(opts.out_dir, 'data'))
        self.start = time.time()
        self.steps: List[dict] = []

    # ---------------------------------------------------------------- running tools
    def _header(self, title: str) -> None:
        elapsed = time.time() - self.start
        total = NUM_STEPS - (0 if self.opts.num_vis else 2)
        print(f'\n==> [{len(self.steps) + 1}/{total}] {title}  (demo time so far '
              f'{int(elapsed // 60)}:{int(elapsed % 60):02d})', flush=True)

    def _record(self, title: str, since: float, command: Optional[List[str]] = None) -> None:
        self.steps.append(dict(step=title, seconds=round(time.time() - since, 1),
                               command=shlex.join(command) if command else None))

    def run_tool(self, title: str, tool: str, args: List[str]) -> None:
        """Run ``python tools/<tool> ARGS`` in a child process, its output shown as it comes."""
        self._header(title)
        since = time.time()
        command = [sys.executable, project_file(f'tools/{tool}')] + args
        print('$ ' + shlex.join(command), flush=True)
        subprocess.run(command, check=True, env=child_env())
        self._record(title, since, command)

    def run_runner_tool(self, title: str, tool: str, args: List[str], work_dir: str) -> str:
        """:meth:`run_tool` for ``train.py``/``test.py``; returns the run folder
        (``WORK_DIR/TIMESTAMP``) that its Runner created."""
        os.makedirs(work_dir, exist_ok=True)
        before = set(os.listdir(work_dir))
        self.run_tool(title, tool, args)
        runs = sorted(d for d in set(os.listdir(work_dir)) - before
                      if osp.isdir(osp.join(work_dir, d)) and d[:8].isdigit())
        if not runs:
            raise RuntimeError(f'{tool} wrote no run folder (TIMESTAMP/) in {work_dir}')
        return osp.join(work_dir, runs[-1])

    # ---------------------------------------------------------------- config options
    def cfg_options(self, task: str) -> List[str]:
        """``--cfg-options`` of a task's runs: the toy data under ``data_dir``, then the user's
        overrides."""
        root = toy_data_paths(self.data_dir)['coco' if task == 'det' else 'ade']
        options = [f'{loader}.dataset.data_root={root}' for loader in LOADERS]
        if task == 'det':
            ann = root + COCO_ANN_FILE.format(split='val')
            options += [f'{ev}.ann_file={ann}' for ev in ('val_evaluator', 'test_evaluator')]
            return options + list(self.opts.det_options)
        return options + list(self.opts.seg_options)

    def train(self, task: str, config: str, work_dir: str) -> str:
        """Train; returns the run folder (its JSON log has the curves)."""
        name = 'detector' if task == 'det' else 'segmentor'
        return self.run_runner_tool(
            f'Train the {name}: {osp.basename(config)}', 'train.py',
            [config, '--work-dir', work_dir, '--cfg-options'] + self.cfg_options(task), work_dir)

    def test(self, task: str, config: str, checkpoint: str, work_dir: str, tta: bool = False,
             out: Optional[str] = None) -> Dict[str, float]:
        """Evaluate ``checkpoint`` on the held-out split; returns the metrics."""
        args = [config, checkpoint, '--work-dir', work_dir]
        args += ['--tta'] if tta else []
        args += ['--out', out] if out else []
        name = 'detector' if task == 'det' else 'segmentor'
        title = f'Evaluate the {name} on the held-out split' + (' with --tta' if tta else '')
        run_dir = self.run_runner_tool(title, 'test.py',
                                       args + ['--cfg-options'] + self.cfg_options(task),
                                       work_dir)
        with open(osp.join(run_dir, f'{osp.basename(run_dir)}.json')) as f:
            return json.load(f)

    def draw(self, task: str, config: str, checkpoint: str, folder: str) -> List[str]:
        """Draw the predictions on the first ``num_vis`` images of ``folder`` with
        ``tools/infer.py`` (none with ``num_vis`` 0); returns the PNGs."""
        if not self.opts.num_vis:
            return []
        images = [osp.join(folder, n) for n in sorted(os.listdir(folder))[:self.opts.num_vis]]
        out_dir = osp.join(self.out_dir, 'vis', task)
        name = 'detections' if task == 'det' else 'segmentation'
        options = self.opts.det_options if task == 'det' else self.opts.seg_options
        self.run_tool(f'Draw the {name} of {len(images)} held-out images', 'infer.py',
                      [config, checkpoint] + images + ['--out-dir', out_dir] +
                      (['--cfg-options'] + list(options) if options else []))
        stems = [osp.splitext(osp.basename(p))[0] for p in images]
        return [osp.join(out_dir, 'vis', f'{stem}.png') for stem in stems]

    # ---------------------------------------------------------------- the whole job
    def make_data(self) -> Dict[str, str]:
        self._header('Write the toy data set (COCO and ADE20K layouts)')
        since = time.time()
        paths = make_toy_data(self.data_dir, self.opts.num_train, self.opts.num_val,
                              seed=self.opts.seed)
        self._record('Write the toy data set', since)
        return paths

    def run(self) -> dict:
        """Run every step; returns what ``metrics.json`` holds.

        ``metrics.json`` is written first (``finished`` false until the last step), once the
        previous run's outputs that would pass for this run's are removed
        (:data:`PREVIOUS_OUTPUTS`), and rewritten after each evaluation, so a step that fails
        keeps the metrics and times of those before it.
        """
        det_config, seg_config = project_file(DET_CONFIG), project_file(SEG_CONFIG)
        det_dir, seg_dir = osp.join(self.out_dir, 'det'), osp.join(self.out_dir, 'seg')
        det, seg = dict(config=det_config), dict(config=seg_config)
        result = dict(detection=det, segmentation=seg,
                      data=dict(toy_data_paths(self.data_dir), num_train=self.opts.num_train,
                                num_val=self.opts.num_val),
                      options=asdict(self.opts), steps=self.steps, finished=False)
        self.remove_previous_outputs()
        self.save(result)  # from now on the files describe this run, even if it stops early
        paths = self.make_data()

        det_run = self.train('det', det_config, det_dir)
        det['checkpoint'] = last_checkpoint(det_dir)
        det['test'] = self.test('det', det_config, det['checkpoint'], osp.join(det_dir, 'test'),
                                out=osp.join(det_dir, 'test', 'predictions.pkl'))
        det['box_AP'] = box_ap(det['test'])
        self.save(result)

        seg_run = self.train('seg', seg_config, seg_dir)
        seg['checkpoint'] = last_checkpoint(seg_dir)
        seg['test'] = self.test('seg', seg_config, seg['checkpoint'], osp.join(seg_dir, 'test'),
                                out=osp.join(seg_dir, 'test', 'pred_maps'))
        seg['mIoU'] = seg['test'][SEG_METRIC]
        self.save(result)
        seg['test_tta'] = self.test('seg', seg_config, seg['checkpoint'],
                                    osp.join(seg_dir, 'test_tta'), tta=True)
        seg['mIoU_tta'] = seg['test_tta'][SEG_METRIC]
        self.save(result)

        det['images'] = self.draw('det', det_config, det['checkpoint'],
                                  osp.join(paths['coco'], COCO_IMG_DIR.format(split='val')))
        seg['images'] = self.draw('seg', seg_config, seg['checkpoint'],
                                  osp.join(paths['ade'], 'images', 'validation'))

        self._header('Plot the training curves and write the summary')
        since = time.time()
        det['curves'] = plot_logs([train_log(det_run)], osp.join(self.out_dir, 'curves', 'det'),
                                  legends=['RetinaNet, Twins-SVT (toy)'])
        seg['curves'] = plot_logs([train_log(seg_run)], osp.join(self.out_dir, 'curves', 'seg'),
                                  legends=['Semantic FPN, Twins-SVT (toy)'])
        self._record('Plot the training curves and write the summary', since)
        result.update(wall_time_s=round(time.time() - self.start, 1), finished=True)
        self.write_summary(result)
        check_finite(result)
        return result

    def remove_previous_outputs(self) -> None:
        """Remove what a previous run in ``out_dir`` wrote that this run writes later
        (:data:`PREVIOUS_OUTPUTS`): left in place, a run that stops early would show them as
        its own. Only where a previous run's ``metrics.json`` is there: folders of the same
        names in an ``out_dir`` no demo has run in are the user's. Training work dirs
        (checkpoints, logs) stay."""
        if not osp.isfile(osp.join(self.out_dir, 'metrics.json')):
            return
        for relpath in PREVIOUS_OUTPUTS:
            path = osp.join(self.out_dir, relpath)
            if osp.isdir(path) and not osp.islink(path):
                shutil.rmtree(path)
            elif osp.lexists(path):
                os.remove(path)

    def save(self, result: dict) -> None:
        """Write ``result`` to ``metrics.json`` (atomically: the previous one or this one)."""
        atomic_write(osp.join(self.out_dir, 'metrics.json'), json.dumps(result, indent=2))

    def write_summary(self, result: dict) -> None:
        """Print the summary table; write it to ``summary.md`` and everything to
        ``metrics.json``."""
        det, seg = result['detection'], result['segmentation']
        minutes = result['wall_time_s'] / 60
        rows = [
            '| task | model | metric on the held-out split | single scale | --tta |',
            '|---|---|---|---|---|',
            f'| detection | RetinaNet, Twins-SVT | box AP (COCO) | {det["box_AP"]:.1f} | - |',
            f'| segmentation | Semantic FPN, Twins-SVT | mIoU | {seg["mIoU"]:.1f} | '
            f'{seg["mIoU_tta"]:.1f} |',
        ]
        lines = rows + [
            '',
            f'{result["data"]["num_train"]} training and {result["data"]["num_val"]} held-out '
            f'toy images; the whole demo took {minutes:.1f} min.',
            f'Metrics: {osp.join(self.out_dir, "metrics.json")}',
            f'Drawn predictions: {osp.join(self.out_dir, "vis", "{det,seg}", "vis")}',
            f'Curves: {osp.join(self.out_dir, "curves", "{det,seg}")}',
        ]
        text = '\n'.join(lines)
        print('\n' + text, flush=True)
        atomic_write(osp.join(self.out_dir, 'summary.md'), text + '\n')
        self.save(result)


def child_env() -> Dict[str, str]:
    """The environment of the tools run: this one, with the source checkout this mmtwins is
    imported from first on PYTHONPATH (as ``tools/dist_train.sh`` does), so they run the same code
    (an installed package is found as it is), and one OpenMP thread per process unless
    ``OMP_NUM_THREADS`` is set: the toy models' ops are too small to gain from more, and on a busy
    2-core machine a second thread waiting for a core made each training iteration up to 35x
    slower here (the data loader worker takes the other core)."""
    env = dict(os.environ)
    root = source_checkout()
    if root is not None:
        env['PYTHONPATH'] = os.pathsep.join(p for p in (str(root), env.get('PYTHONPATH')) if p)
    env.setdefault('OMP_NUM_THREADS', '1')
    return env


def last_checkpoint(work_dir: str) -> str:
    """The checkpoint the Runner saved last in ``work_dir`` (its ``last_checkpoint`` file)."""
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def train_log(run_dir: str) -> str:
    """The JSON log (loss, lr, validation metrics) of the training run in ``run_dir``."""
    return osp.join(run_dir, 'vis_data', f'{osp.basename(run_dir)}.json')


def box_ap(metrics: Dict[str, float]) -> float:
    """COCO box AP in percent. mmdet's CocoMetric computes nothing when the detector predicted
    no box above ``model.test_cfg.score_thr`` on the whole split: that is an AP of 0."""
    if DET_METRIC not in metrics:
        print('The detector predicted no box above its score threshold on the held-out split: '
              'box AP 0.', flush=True)
        return 0.
    return round(100 * metrics[DET_METRIC], 1)


def check_finite(result: dict) -> None:
    """Fail loudly if a headline metric is not a finite number."""
    for task, key in (('detection', 'box_AP'), ('segmentation', 'mIoU'),
                      ('segmentation', 'mIoU_tta')):
        value = result[task][key]
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RuntimeError(f'{task} {key} is {value!r}, not a finite number')


def parse_args(argv: Optional[Sequence[str]] = None) -> DemoOptions:
    defaults = DemoOptions()
    parser = argparse.ArgumentParser(
        description='The main job: toy data, then train, evaluate and draw a Twins-SVT RetinaNet '
        'and a Twins-SVT Semantic FPN on CPU (see mmtwins/demo/pipeline.py for the outputs).')
    parser.add_argument('--out-dir', default=defaults.out_dir,
                        help='where every result goes (default: %(default)s)')
    parser.add_argument('--data-dir',
                        help='where the toy data set is written (default: OUT_DIR/data)')
    parser.add_argument('--num-train', type=at_least(1), default=defaults.num_train,
                        help='training images (default: %(default)s)')
    parser.add_argument('--num-val', type=at_least(1), default=defaults.num_val,
                        help='held-out images (default: %(default)s)')
    parser.add_argument('--seed', type=at_least(0), default=defaults.seed,
                        help='the data set\'s seed')
    parser.add_argument('--det-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='config overrides for every run of the detector, e.g. '
                        'train_cfg.val_interval=1 (passed to --cfg-options of the tools)')
    parser.add_argument('--seg-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='config overrides for every run of the segmentor, e.g. '
                        'train_cfg.val_interval=50')
    parser.add_argument('--num-vis', type=at_least(0), default=defaults.num_vis,
                        help='held-out images to draw predictions on, 0 for none (default: '
                        '%(default)s)')
    return DemoOptions(**vars(parser.parse_args(argv)))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return Demo(parse_args(argv)).run()
