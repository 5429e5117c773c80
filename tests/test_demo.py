"""The main job (``make demo``): the toy data generator, and a shortened run of the whole pipeline
(tools/train.py, tools/test.py with and without --tta, tools/infer.py, curves, summary)."""
import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ade_toy import miou_from_maps, read_label_maps
from coco_toy import coco_stats
from mmtwins.demo import CLASSES, SEG_CLASSES, make_toy_data
from mmtwins.demo.toy_data import toy_data_paths
from mmtwins.demo.inference import infer, list_images
from mmtwins.demo.pipeline import main as demo_main


SIZE = 128


def _read_coco(root, split):
    with open(root / 'coco' / 'annotations' / f'instances_{split}.json') as f:
        return json.load(f)


def test_toy_data_layouts_agree_and_are_deterministic(tmp_path):
    make_toy_data(str(tmp_path / 'a'), num_train=6, num_val=3, seed=0)
    make_toy_data(str(tmp_path / 'b'), num_train=3, num_val=3, seed=0)
    a, b = tmp_path / 'a', tmp_path / 'b'

    # A smaller set is a prefix of a larger one; the held-out split does not depend on it.
    for rel in ('coco/train/000003.jpg', 'coco/val/000003.jpg',
                'ade/ADEChallengeData2016/annotations/validation/ADE_val_00000003.png'):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert _read_coco(a, 'val') == _read_coco(b, 'val')
    assert (a / 'coco/train/000001.jpg').read_bytes() != (a / 'coco/val/000001.jpg').read_bytes()

    coco = _read_coco(a, 'train')
    assert [c['name'] for c in coco['categories']] == list(CLASSES)
    assert len(coco['images']) == 6 and coco['annotations']
    ade = a / 'ade' / 'ADEChallengeData2016'
    assert len(list((ade / 'images' / 'training').glob('*.jpg'))) == 6
    by_image = {img['id']: [] for img in coco['images']}
    for ann in coco['annotations']:
        by_image[ann['image_id']].append(ann)
    for img in coco['images']:
        index = int(img['file_name'][:6])
        image = Image.open(a / 'coco' / 'train' / img['file_name'])
        assert (image.size, image.mode) == ((SIZE, SIZE), 'RGB')
        label_map = np.asarray(Image.open(ade / 'annotations' / 'training' /
                                          f'ADE_train_{index:08d}.png'))
        assert label_map.shape == (SIZE, SIZE)
        # The label map (1 background, 2.. the classes) shows exactly the annotated classes.
        annotated = {ann['category_id'] + 1 for ann in by_image[img['id']]}
        assert set(np.unique(label_map)) == {1} | annotated
        for ann in by_image[img['id']]:
            x, y, w, h = ann['bbox']
            assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE and min(w, h) >= 8
            xs, ys = ann['segmentation'][0][0::2], ann['segmentation'][0][1::2]
            assert [x, y, x + w, y + h] == pytest.approx([min(xs), min(ys), max(xs), max(ys)])
            inside = label_map[int(y):math.ceil(y + h) + 1, int(x):math.ceil(x + w) + 1]
            # the polygon's pixels in the map match its area (up to the rasterised border)
            pixels = np.count_nonzero(inside == ann['category_id'] + 1)
            assert abs(pixels - ann['area']) <= 0.1 * ann['area'] + 2 * (w + h)


def test_a_smaller_toy_set_replaces_a_larger_one(tmp_path):
    """mmseg reads every image of a split folder, so a second, smaller set written to the same
    place leaves none of the first's extra images or label maps; other files stay."""
    make_toy_data(str(tmp_path), num_train=6, num_val=3, seed=0)
    ade = tmp_path / 'ade' / 'ADEChallengeData2016'
    (ade / 'images' / 'training' / 'notes.txt').write_text('mine')
    make_toy_data(str(tmp_path), num_train=3, num_val=2, seed=0)
    for folder, count in (('coco/train', 3), ('coco/val', 2),
                          ('ade/ADEChallengeData2016/images/training', 3),
                          ('ade/ADEChallengeData2016/annotations/training', 3),
                          ('ade/ADEChallengeData2016/images/validation', 2),
                          ('ade/ADEChallengeData2016/annotations/validation', 2)):
        names = sorted(p.name for p in (tmp_path / folder).glob('*.[jp][pn]g'))
        assert len(names) == count and names[-1][-7:-4] == f'{count:03d}', (folder, names)
    assert (ade / 'images' / 'training' / 'notes.txt').read_text() == 'mine'
    assert len(_read_coco(tmp_path, 'train')['images']) == 3


def test_a_real_ade20k_copy_is_never_written_over(tmp_path):
    """The toy ADE20K layout has the real names: a copy under OUT/ade is left as it is."""
    training = tmp_path / 'ade' / 'ADEChallengeData2016' / 'images' / 'training'
    training.mkdir(parents=True)
    for name in ('ADE_train_00000001.jpg', 'ADE_train_00020210.jpg'):
        (training / name).write_bytes(b'a real image')
    with pytest.raises(FileExistsError, match=r'training holds files that the toy data writer '
                       r'did not make \(no \.mmtwins_toy_data in'):
        make_toy_data(str(tmp_path), num_train=2, num_val=1)
    assert sorted(p.read_bytes() for p in training.iterdir()) == [b'a real image'] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ade']  # nothing written

    toy = tmp_path / 'toy'
    make_toy_data(str(toy), num_train=2, num_val=1)
    (toy / '.mmtwins_toy_data').unlink()  # a toy set written before the marker: known by its
    make_toy_data(str(toy), num_train=1, num_val=1)  # COCO classes, and written over
    assert (toy / '.mmtwins_toy_data').exists()


def test_the_demo_keeps_its_metrics_when_a_later_step_fails(tmp_path, monkeypatch):
    """metrics.json is written after each evaluation; --num-vis 0 draws nothing. The training
    and test runs are faked here (test_demo_pipeline_shortened runs them for real)."""
    from mmtwins.demo import pipeline
    demo = pipeline.Demo(pipeline.parse_args(['--out-dir', str(tmp_path), '--num-vis', '0']))

    def train(task, config, work_dir):
        os.makedirs(work_dir, exist_ok=True)
        (Path(work_dir) / 'last_checkpoint').write_text(f'{work_dir}/epoch_1.pth')
        return work_dir

    scores = iter([{'coco/bbox_mAP': 0.25}, {'mIoU': 40.0}, {'mIoU': 42.0}])
    monkeypatch.setattr(demo, 'make_data', lambda: toy_data_paths(str(tmp_path / 'data')))
    monkeypatch.setattr(demo, 'train', train)
    monkeypatch.setattr(demo, 'test', lambda *args, **kwargs: next(scores))

    def plot_fails(*args, **kwargs):
        raise RuntimeError('the plot failed')

    monkeypatch.setattr(pipeline, 'plot_logs', plot_fails)
    with pytest.raises(RuntimeError, match='the plot failed'):
        demo.run()
    saved = json.loads((tmp_path / 'metrics.json').read_text())
    assert saved['finished'] is False and 'wall_time_s' not in saved
    assert saved['detection']['box_AP'] == 25.0
    assert (saved['segmentation']['mIoU'], saved['segmentation']['mIoU_tta']) == (40.0, 42.0)
    assert not (tmp_path / 'summary.md').exists()

    scores = iter([{'coco/bbox_mAP': 0.25}, {'mIoU': 40.0}, {'mIoU': 42.0}])
    monkeypatch.setattr(pipeline, 'plot_logs', lambda *args, **kwargs: [])
    result = demo.run()
    assert result['finished'] is True and result['detection']['images'] == []
    assert json.loads((tmp_path / 'metrics.json').read_text()) == json.loads(json.dumps(result))
    assert '| 25.0 |' in (tmp_path / 'summary.md').read_text()
    with pytest.raises(SystemExit):
        pipeline.parse_args(['--num-vis', '-1'])


def test_an_installed_package_runs_its_own_tools(tmp_path, monkeypatch):
    """Installed from a wheel, mmtwins' parent is site-packages: the tools come from its .mim
    copy (not a stray site-packages/tools/), and site-packages is not put first on PYTHONPATH."""
    from mmtwins.demo import pipeline
    assert pipeline.source_checkout() == Path(pipeline.__file__).resolve().parents[2]
    site = tmp_path / 'site-packages'
    for path in ('mmtwins/.mim/tools/train.py', 'tools/train.py'):
        (site / path).parent.mkdir(parents=True, exist_ok=True)
        (site / path).write_text('')
    monkeypatch.setattr(pipeline, 'PACKAGE', site / 'mmtwins')
    monkeypatch.delenv('PYTHONPATH', raising=False)
    assert pipeline.source_checkout() is None
    assert pipeline.project_file('tools/train.py') == str(site / 'mmtwins/.mim/tools/train.py')
    assert 'PYTHONPATH' not in pipeline.child_env()


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='no image file or folder'):
        list_images([str(tmp_path / 'missing.jpg')])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='no image'):
        list_images([str(tmp_path / 'empty')])
    for folder in ('x', 'y'):
        (tmp_path / folder).mkdir()
        Image.new('RGB', (8, 8)).save(tmp_path / folder / 'same.png')
    with pytest.raises(ValueError, match='share the file name'):
        list_images([str(tmp_path / 'x'), str(tmp_path / 'y')])


def test_list_images_takes_upper_case_suffixes(tmp_path):
    for name in ('IMG_0001.JPG', 'b.png', 'notes.txt'):
        (tmp_path / name).write_bytes(b'')
    assert list_images([str(tmp_path)]) == [str(tmp_path / 'IMG_0001.JPG'), str(tmp_path / 'b.png')]


@pytest.mark.usefixtures('one_torch_thread')  # the in-process inference at the end
def test_demo_pipeline_shortened(tmp_path, monkeypatch):
    """The whole main job with 16 + 8 images, 1 detector epoch (2 iterations) and 4 segmentor
    iterations. The detector keeps every box (score_thr=0), so that its barely trained scores
    still give a COCO evaluation."""
    out, data = tmp_path / 'demo', tmp_path / 'data'
    result = demo_main([
        '--out-dir', str(out), '--data-dir', str(data), '--num-train', '16', '--num-val', '8',
        '--num-vis', '2', '--det-options', 'train_cfg.max_epochs=1', 'model.test_cfg.score_thr=0',
        '--seg-options', 'train_cfg.max_iters=4'
    ])
    with open(out / 'metrics.json') as f:
        assert json.load(f) == json.loads(json.dumps(result))
    det, seg = result['detection'], result['segmentation']

    # Real metrics, computed on the 8 held-out images.
    assert 'coco/bbox_mAP' in det['test'] and math.isfinite(det['box_AP'])
    assert det['box_AP'] == round(100 * det['test']['coco/bbox_mAP'], 1)
    for metrics in (seg['test'], seg['test_tta']):
        assert all(math.isfinite(metrics[k]) and 0 <= metrics[k] <= 100
                   for k in ('aAcc', 'mIoU', 'mAcc'))
    # The reported box APs and single-scale mIoU are those recomputed from the saved raw
    # predictions: with pycocotools on the held-out annotations, and from the maps and the
    # annotation PNGs.
    with open(out / 'det' / 'test' / 'predictions.pkl', 'rb') as f:
        preds = pickle.load(f)
    assert sorted(p['img_id'] for p in preds) == list(range(1, 9))
    stats = coco_stats(data / 'coco' / 'annotations' / 'instances_val.json', preds, CLASSES)
    reported = [det['test'][f'coco/bbox_mAP{s}'] for s in ('', '_50', '_75', '_s', '_m', '_l')]
    assert reported == pytest.approx(stats[:6], abs=5e-4), (reported, stats)
    labels = read_label_maps(Path(result['data']['ade']))
    assert len(labels) == 8
    assert miou_from_maps(out / 'seg' / 'test' / 'pred_maps', labels) == pytest.approx(
        seg['test']['mIoU'], abs=0.01)
    assert (seg['mIoU'], seg['mIoU_tta']) == (seg['test']['mIoU'], seg['test_tta']['mIoU'])
    summary = (out / 'summary.md').read_text()
    assert f'| {det["box_AP"]:.1f} |' in summary and f'| {seg["mIoU_tta"]:.1f} |' in summary

    # The steps ran the project's tools; the raw predictions of the held-out split are saved.
    commands = [s['command'] for s in result['steps'] if s['command']]
    assert len(result['steps']) == 9 and len(commands) == 7
    assert sum('tools/train.py' in c for c in commands) == 2
    assert sum('tools/test.py' in c for c in commands) == 3 and '--tta' in commands[4]
    assert sum('tools/infer.py' in c for c in commands) == 2
    assert len(list((out / 'seg' / 'test' / 'pred_maps').glob('*.png'))) == 8

    # Predictions drawn on 2 held-out images per task, and the raw predictions next to them.
    for task in ('det', 'seg'):
        assert len(result['detection' if task == 'det' else 'segmentation']['images']) == 2
    for path in det['images'] + seg['images']:
        assert Image.open(path).format == 'PNG' and Image.open(path).size == (SIZE, SIZE)
    with open(out / 'vis' / 'det' / 'pred' / '000001.json') as f:
        pred = json.load(f)
    assert pred['classes'] == list(CLASSES) and len(pred['bboxes']) == len(pred['scores']) > 0
    seg_pred = np.asarray(Image.open(out / 'vis' / 'seg' / 'pred' / 'ADE_val_00000001.png'))
    assert seg_pred.shape == (SIZE, SIZE) and seg_pred.max() < len(SEG_CLASSES)

    # Curves of both trainings.
    for path in det['curves'] + seg['curves']:
        assert Image.open(path).format == 'PNG'
    names = {p.name for p in (out / 'curves' / 'det').iterdir()}
    assert names == {'loss.png', 'lr.png', 'coco_bbox_mAP.png'}
    names = {p.name for p in (out / 'curves' / 'seg').iterdir()}
    assert names == {'loss.png', 'lr.png', 'mIoU.png'}

    # Inference on a folder with the library API, as tools/infer.py does, in inferencer calls of
    # 7 images: the 8 held-out ones end with a call of one (mmseg, not mmdet, unwraps that).
    monkeypatch.setattr('mmtwins.demo.inference.CHUNK', 7)
    written = infer(det['config'], det['checkpoint'], [str(data / 'coco' / 'val')],
                    str(tmp_path / 'infer'), device='cpu', score_thr=0.)
    assert [p.rsplit('/', 1)[1] for p in written['pred']] == [f'{i:06d}.json' for i in range(1, 9)]
    assert all(Image.open(p).size == (SIZE, SIZE) for p in written['vis'])
    ade_val = Path(result['data']['ade']) / 'images' / 'validation'
    written = infer(seg['config'], seg['checkpoint'], [str(ade_val)], str(tmp_path / 'infer_seg'),
                    device='cpu')
    assert [p.rsplit('/', 1)[1] for p in written['pred']] == [
        f'ADE_val_{i:08d}.png' for i in range(1, 9)]
    assert all(np.asarray(Image.open(p)).shape == (SIZE, SIZE) for p in written['pred'])
