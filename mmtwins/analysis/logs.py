"""Read MMEngine's JSON training logs and plot loss, learning rate and metrics to PNG files.

MMEngine's ``LoggerHook`` writes one JSON object per line to
``WORK_DIR/TIMESTAMP/vis_data/TIMESTAMP.json``: training records carry ``loss``, ``lr``... and
``step`` (the global iteration); validation records carry the metrics (``accuracy/top1``,
``coco/bbox_mAP``, ``mIoU``...) and a ``step`` that is the epoch for epoch-based runs and the
iteration for iteration-based ones. Every curve here is drawn over iterations: a validation
record is placed at the iteration of the last training record before it.
"""
import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

TRAIN_DEFAULT_KEYS = ('loss', 'lr')
# The headline metric of each task, plotted by default when the log has it.
METRIC_DEFAULT_KEYS = ('accuracy/top1', 'coco/bbox_mAP', 'coco/segm_mAP', 'mIoU')
_NOT_METRICS = {'step', 'epoch', 'iter', 'time', 'data_time', 'memory'}


@dataclass
class TrainingLog:
    """Curves of one log: ``curves[key] = (iterations, values)``."""
    path: str
    curves: Dict[str, Tuple[List[int], List[float]]] = field(default_factory=dict)

    def add(self, key: str, x: int, y: float) -> None:
        xs, ys = self.curves.setdefault(key, ([], []))
        xs.append(x)
        ys.append(y)


def find_json_log(path: str) -> str:
    """``path`` itself if it is a file, else the newest MMEngine JSON log under the work dir."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f'no log file or work directory at {path}')
    logs = [p for p in glob.glob(os.path.join(path, '**', 'vis_data', '*.json'), recursive=True)
            if os.path.basename(p) != 'scalars.json']
    if not logs:
        raise FileNotFoundError(f'no MMEngine JSON log (*/vis_data/TIMESTAMP.json) under {path}')
    return max(logs, key=os.path.getmtime)


def load_json_log(path: str) -> TrainingLog:
    """Parse an MMEngine JSON log (a file, or a work dir holding one) into curves."""
    path = find_json_log(path)
    log = TrainingLog(path)
    last_train_step = 0
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f'{path}:{lineno} is not a JSON record: {e}') from e
            step = int(record.get('step', 0))
            is_train = 'lr' in record or 'loss' in record
            if is_train:
                last_train_step = step
            x = step if is_train else max(step, last_train_step)
            for key, value in record.items():
                if key not in _NOT_METRICS and isinstance(value, (int, float)):
                    log.add(key, x, float(value))
    return log


def default_keys(logs: Sequence[TrainingLog]) -> List[str]:
    present = set().union(*(log.curves for log in logs))
    return [k for k in TRAIN_DEFAULT_KEYS + METRIC_DEFAULT_KEYS if k in present]


def _file_name(key: str) -> str:
    return re.sub(r'[^A-Za-z0-9_.-]+', '_', key) + '.png'


def plot_logs(paths: Sequence[str],
              out_dir: str,
              keys: Optional[Sequence[str]] = None,
              legends: Optional[Sequence[str]] = None) -> List[str]:
    """Write one PNG per key, with one curve per log, and return the files written.

    Args:
        paths: JSON logs or work dirs.
        out_dir: where the PNGs go (``loss.png``, ``lr.png``, ``accuracy_top1.png``...).
        keys: what to plot; default: loss, lr and the task's headline metric where present.
        legends: a label per log (default: the log's file name).
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    logs = [load_json_log(p) for p in paths]
    if legends is not None and len(legends) != len(logs):
        raise ValueError(f'{len(legends)} legends for {len(logs)} logs')
    legends = legends or [os.path.basename(log.path) for log in logs]
    keys = list(keys) if keys else default_keys(logs)
    if not keys:
        raise ValueError('none of the default keys (loss, lr, the task metrics) is in the logs')
    missing = [k for k in keys if not any(k in log.curves for log in logs)]
    if missing:
        available = sorted(set().union(*(log.curves for log in logs)))
        raise KeyError(f'key(s) {missing} are in none of the logs; available: {available}')
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for key in keys:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for log, label in zip(logs, legends):
            if key in log.curves:
                xs, ys = log.curves[key]
                ax.plot(xs, ys, marker='o' if len(xs) < 30 else None, label=label)
        ax.set_xlabel('iteration')
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = os.path.join(out_dir, _file_name(key))
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written
