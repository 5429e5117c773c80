"""Plot loss, learning rate and metrics (top-1, mAP, mIoU) of MMEngine JSON logs to PNG files.

    python tools/analysis_tools/plot_logs.py WORK_DIR_OR_JSON [...] --out-dir plots
        [--keys loss lr accuracy/top1] [--legend run-a run-b]

A work dir's logs are read as one run, resumed where it has several; where it was trained into
from scratch again (MMEngine's text log of each start says whether it resumed), only its newest
run is plotted, and a note on stderr names the runs left out (give one's JSON log to plot it).
The PNG files written are printed, one a line.
"""
import argparse
import sys

from mmtwins.analysis import plot_logs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('logs', nargs='+', help='JSON logs (vis_data/TIMESTAMP.json) or work dirs')
    p.add_argument('--out-dir', default='plots', help='where the PNG files go')
    p.add_argument('--keys', nargs='+',
                   help='what to plot (default: loss, lr and the task metric found in the logs)')
    p.add_argument('--legend', nargs='+', help='one label per log')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        paths = plot_logs(args.logs, args.out_dir, args.keys, args.legend,
                          note=lambda line: print(line, file=sys.stderr))
    except (FileNotFoundError, KeyError, ValueError) as e:  # the logs or the options given
        raise SystemExit(f'plot_logs.py: error: {e.args[0] if isinstance(e, KeyError) else e}')
    for path in paths:
        print(path)


if __name__ == '__main__':
    main()
