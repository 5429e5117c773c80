"""The peer comparison tool's short mode (run in CI): mmtwins agrees with every installed peer."""
import json
import subprocess
import sys
from pathlib import Path

from mmtwins.analysis.peers import PEERS, available_peers, compare_case, format_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_every_peer_is_installed_for_the_comparison():
    # timm is a test dependency and mmseg/mmpretrain are runtime ones: none may be missing.
    assert available_peers() == list(PEERS)


def test_compare_peers_short_mode_asserts_agreement(tmp_path):
    out = tmp_path / 'peers.json'
    res = subprocess.run([sys.executable, str(ROOT / 'tools/analysis_tools/compare_peers.py'),
                          '--short', '--out', str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data['peers'] == list(PEERS) and data['machine']['threads'] >= 1
    assert [c['variant'] for c in data['cases']] == ['pcpvt-small', 'svt-small']
    for case in data['cases']:
        assert set(case['max_abs_diff']) == set(PEERS)
        assert all(d <= 1e-4 for d in case['max_abs_diff'].values()), case['max_abs_diff']
        assert set(case['seconds']) == {'mmtwins', *PEERS}
        assert all(t > 0 for t in case['seconds'].values())


def test_training_case_with_cp_one_process_at_a_time():
    """The COCO case's mode, on a small input: with_cp entry, workers one after another, memory
    measured; gradient checkpointing keeps well under half the activations (a count)."""
    res = compare_case('svt', 'small', 'train', (1, 3, 64, 64), peers=['timm'], warmup=1,
                       repeats=1, with_cp=True, interleave=False, log=lambda line: None)
    assert set(res.seconds) == {'mmtwins', 'timm', 'mmtwins-with_cp'} and not res.interleaved
    assert all(t > 0 for t in res.seconds.values())
    assert res.saved_mb['mmtwins-with_cp'] < 0.6 * res.saved_mb['mmtwins']
    assert res.saved_mb['mmtwins'] <= 0.8 * res.saved_mb['timm']
    assert set(res.peak_mb) == set(res.seconds)
    assert '(*) implementations run one after another' in format_markdown([res])
