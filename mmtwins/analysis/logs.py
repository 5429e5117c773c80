"""Read MMEngine's JSON training logs and plot loss, learning rate and metrics to PNG files.

MMEngine's ``LoggerHook`` writes one JSON object per line to
``WORK_DIR/TIMESTAMP/vis_data/TIMESTAMP.json``: training records carry ``loss``, ``lr``... and
``step`` (the global iteration); validation records carry the metrics (``accuracy/top1``,
``coco/bbox_mAP``, ``mIoU``...) and a ``step`` that is the epoch for epoch-based runs and the
iteration for iteration-based ones. Every curve here is drawn over iterations: a validation
record is placed at the iteration of the last training record before it. A resumed run writes
a log of its own under a new ``TIMESTAMP``: a work dir's logs are read oldest first as one run,
except where a log starts a new run (trained from scratch into the same work dir, see
:func:`split_runs`): only the newest run is read.
"""
import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

TRAIN_DEFAULT_KEYS = ('loss', 'lr')
# The headline metric of each task, plotted by default when the log has it.
METRIC_DEFAULT_KEYS = ('accuracy/top1', 'coco/bbox_mAP', 'coco/segm_mAP', 'mIoU')
_NOT_METRICS = {'step', 'epoch', 'iter', 'time', 'data_time', 'memory'}


@dataclass
class TrainingLog:
    """Curves of one run: ``curves[key] = (iterations, values)``, iterations ascending.

    ``path`` is what was given (a JSON log or a work dir), ``files`` the logs read from it,
    ``earlier_runs`` the logs of the work dir's earlier runs left out (one list per run).
    """
    path: str
    files: List[str] = field(default_factory=list)
    curves: Dict[str, Tuple[List[int], List[float]]] = field(default_factory=dict)
    earlier_runs: List[List[str]] = field(default_factory=list)

    def left_out_note(self) -> Optional[str]:
        """A line naming the earlier runs left out and how to plot one; None if there were none.
        A run is named by the ``TIMESTAMP`` folder of its first log."""
        if not self.earlier_runs:
            return None
        names = ', '.join(_run_name(run[0]) + (f' ({len(run)} logs)' if len(run) > 1 else '')
                          for run in self.earlier_runs)
        return (f'{self.path}: plotting the newest run (from {_run_name(self.files[0])}); left '
                f'out the earlier run(s) trained from scratch into the same work dir: {names} '
                '(pass a JSON log, TIMESTAMP/vis_data/TIMESTAMP.json, to plot one of those)')


def find_json_logs(path: str) -> List[str]:
    """``[path]`` if it is a file; for a work dir, its runs' logs
    (``WORK_DIR/TIMESTAMP/vis_data/TIMESTAMP.json``), oldest first."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f'no log file or work directory at {path}')
    logs = [p for p in glob.glob(os.path.join(glob.escape(path), '*', 'vis_data', '*.json'))
            if os.path.basename(p) != 'scalars.json']
    if not logs:
        raise FileNotFoundError(f'no MMEngine JSON log (TIMESTAMP/vis_data/TIMESTAMP.json) in '
                                f'the work directory {path}')
    return sorted(logs, key=lambda p: (os.path.basename(p), os.path.getmtime(p)))


def _run_name(file: str) -> str:
    """The ``TIMESTAMP`` folder of a log in ``WORK_DIR/TIMESTAMP/vis_data/``."""
    return os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(file))))


def _read_records(file: str) -> List[dict]:
    """The JSON records of a log, one a line (blank lines skipped).

    Raises:
        ValueError: a line is not JSON (its file and line number named).
    """
    records = []
    with open(file) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f'{file}:{lineno} is not a JSON record: {e}') from e
    return records


def _is_train(record: dict) -> bool:
    return 'lr' in record or 'loss' in record


#: MMEngine's ``Runner.resume`` logs this line (to ``TIMESTAMP/TIMESTAMP.log``) before training.
_RESUMED_LINE = 'resumed epoch: '
#: A training progress line of that log (``Epoch(train) [1][50/500]``, ``Iter(train) [50/80000]``).
_TRAIN_LINE = re.compile(r'(Epoch|Iter)\(train\)')


def resumed(json_log: str) -> Optional[bool]:
    """Whether the run that wrote ``WORK_DIR/TIMESTAMP/vis_data/TIMESTAMP.json`` resumed from a
    checkpoint, from its text log beside it (``WORK_DIR/TIMESTAMP/TIMESTAMP.log``), read up to
    its first training line: True where MMEngine logged that it resumed, False where training
    began without that line; None where the text log does not say (there is none, or it has
    neither line: a ``log_level`` above INFO, a log cut short)."""
    text_log = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(json_log))),
                            _run_name(json_log) + '.log')
    if not os.path.isfile(text_log):
        return None
    with open(text_log, errors='replace') as f:
        for line in f:
            if _RESUMED_LINE in line:
                return True
            if _TRAIN_LINE.search(line):
                return False
    return None


def split_runs(logs: Dict[str, List[dict]]) -> List[List[str]]:
    """The runs of a work dir's logs (file -> records, oldest first), each a list of its logs.

    A log with training records starts a new run (training restarted from scratch in the same
    work dir, or from ``load_from`` weights) unless its run resumed from a checkpoint: as
    MMEngine's text log beside it says (:func:`resumed`), or, where that does not say, as told
    by its first training step being after the previous log's first step (a resumed run starts
    after the checkpoint it resumes from; a run resumed from a checkpoint saved before its first
    logged step, with no text log to say so, is then taken for a new one). A log with no
    training record stays with the run before it.
    """
    runs: List[List[str]] = []
    previous_first = None
    for file, records in logs.items():
        first = next((int(r.get('step', 0)) for r in records if _is_train(r)), None)
        said = None if first is None else resumed(file)
        if said is None:
            new = None not in (first, previous_first) and first <= previous_first
        else:
            new = not said
        if not runs or new:
            runs.append([])
        runs[-1].append(file)
        previous_first = previous_first if first is None else first
    return runs


def load_json_log(path: str) -> TrainingLog:
    """Parse an MMEngine JSON log, or the logs of a work dir, into curves.

    A work dir's logs are one run resumed: where a later log has a step again (the iterations
    a resumed run repeats after its last checkpoint), its value replaces the earlier one. Where
    the work dir holds several runs (:func:`split_runs`), only the newest is read; the earlier
    ones are listed in the returned log's ``earlier_runs``.

    Raises:
        FileNotFoundError: no log at ``path``.
        ValueError: a line of a log is not JSON.
    """
    logs = {file: _read_records(file) for file in find_json_logs(path)}
    runs = split_runs(logs)
    points: Dict[str, Dict[int, float]] = {}
    for file in runs[-1]:
        last_train_step = 0
        for record in logs[file]:
            step = int(record.get('step', 0))
            is_train = _is_train(record)
            if is_train:
                last_train_step = step
            x = step if is_train else max(step, last_train_step)
            for key, value in record.items():
                if key not in _NOT_METRICS and isinstance(value, (int, float)):
                    points.setdefault(key, {})[x] = float(value)
    curves = {key: (sorted(xy), [value for _, value in sorted(xy.items())])
              for key, xy in points.items()}
    return TrainingLog(path, runs[-1], curves, runs[:-1])


def default_keys(logs: Sequence[TrainingLog]) -> List[str]:
    present = set().union(*(log.curves for log in logs))
    return [k for k in TRAIN_DEFAULT_KEYS + METRIC_DEFAULT_KEYS if k in present]


def _file_name(key: str) -> str:
    return re.sub(r'[^A-Za-z0-9_.-]+', '_', key) + '.png'


def plot_logs(paths: Sequence[str],
              out_dir: str,
              keys: Optional[Sequence[str]] = None,
              legends: Optional[Sequence[str]] = None,
              note: Callable[[str], None] = print) -> List[str]:
    """Write one PNG per key, with one curve per log, and return the files written.

    Args:
        paths: JSON logs or work dirs.
        out_dir: where the PNGs go (``loss.png``, ``lr.png``, ``accuracy_top1.png``...).
        keys: what to plot; default: loss, lr and the task's headline metric where present.
        legends: a label per log (default: the log's file name, or the work dir's name).
        note: gets a one-line note for each work dir whose earlier runs are left out (a work dir
            trained into from scratch again: only its newest run is plotted).

    Raises:
        FileNotFoundError, ValueError: as :func:`load_json_log`; ValueError also where the
            legends do not match the logs or no default key is in them.
        KeyError: a key given is in none of the logs.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    logs = [load_json_log(p) for p in paths]
    for line in filter(None, (log.left_out_note() for log in logs)):
        note(line)
    if legends is not None and len(legends) != len(logs):
        raise ValueError(f'{len(legends)} legends for {len(logs)} logs')
    legends = legends or [os.path.basename(os.path.normpath(log.path)) for log in logs]
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
