"""The main job (``make demo``): the toy data generator, and a shortened run of the whole pipeline
(tools/train.py, tools/test.py with and without --tta, tools/infer.py, curves, summary)."""
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ade_toy import miou_from_maps, read_label_maps
from coco_toy import coco_stats
from mmtwins.demo import CLASSES, SEG_CLASSES, make_toy_data
from mmtwins.demo.toy_data import toy_data_paths
from mmtwins.demo.inference import InputError, infer, list_images
from mmtwins.demo.inference import main as infer_main
from mmtwins.demo.pipeline import DET_CONFIG, SEG_CONFIG, project_file
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
    markers = [toy / 'coco' / '.mmtwins_toy_data',
               toy / 'ade' / 'ADEChallengeData2016' / '.mmtwins_toy_data']
    assert all(m.exists() for m in markers) and not (toy / '.mmtwins_toy_data').exists()
    for legacy in ('.mmtwins_toy_data', None):  # a toy set written before the markers went
        for marker in markers:  # into the layout roots: known by the one in OUT, or by its
            marker.unlink()  # COCO classes, and written over
        if legacy:
            (toy / legacy).write_text('')
        make_toy_data(str(toy), num_train=1, num_val=1)
        assert all(m.exists() for m in markers) and not (toy / '.mmtwins_toy_data').exists()


def test_the_toy_data_writer_never_writes_through_a_link_or_into_an_unmarked_ade20k(tmp_path):
    """data/ade/ADEChallengeData2016, data/ade or data/coco linked to a real data set (as the
    README sets it up) after a toy set was written to data/: refused, the real files unchanged;
    so is a real ADE20K copy put in the place of the toy set's."""
    real = tmp_path / 'real'
    real_files = ['ade/ADEChallengeData2016/images/training/ADE_train_00000001.jpg',
                  'ade/ADEChallengeData2016/annotations/training/ADE_train_00000001.png',
                  'coco/train2017/000000000009.jpg']
    for relpath in real_files:
        (real / relpath).parent.mkdir(parents=True, exist_ok=True)
        (real / relpath).write_bytes(b'real')
    data = tmp_path / 'data'
    for relpath in ('ade/ADEChallengeData2016', 'ade', 'coco'):
        make_toy_data(str(data), num_train=2, num_val=1)
        link, target = data / relpath, real / relpath
        shutil.rmtree(link)
        link.symlink_to(target, target_is_directory=True)
        with pytest.raises(FileExistsError, match=rf'^{link} is a symbolic link \(to {target}\): '
                           'the toy data writer does not write through links'):
            make_toy_data(str(data), num_train=1, num_val=1)
        link.unlink()
        assert sorted(str(p.relative_to(real)) for p in real.rglob('*') if p.is_file()) == sorted(
            real_files)
        assert all((real / relpath).read_bytes() == b'real' for relpath in real_files)

    make_toy_data(str(data), num_train=2, num_val=1)
    ade = data / 'ade' / 'ADEChallengeData2016'
    shutil.rmtree(ade)
    shutil.copytree(real / 'ade' / 'ADEChallengeData2016', ade)  # a copy, not a link
    with pytest.raises(FileExistsError, match=r'training holds files that the toy data writer '
                       r'did not make \(no \.mmtwins_toy_data in .*ADEChallengeData2016\)'):
        make_toy_data(str(data), num_train=1, num_val=1)
    assert sorted(str(p.relative_to(ade)) for p in ade.rglob('*')
                  if p.is_file()) == sorted(f[len('ade/ADEChallengeData2016/'):]
                                            for f in real_files[:2])


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


def test_a_demo_run_first_clears_what_would_pass_for_its_own_results(tmp_path, monkeypatch):
    """A re-run that fails at its first step leaves metrics.json saying so (finished false, its
    own options) and none of the previous run's summary, drawings, curves or predictions;
    checkpoints and the data stay."""
    from mmtwins.demo import pipeline
    previous = ['summary.md', 'vis/det/vis/000001.png', 'curves/seg/mIoU.png',
                'det/test/predictions.pkl', 'seg/test/pred_maps/ADE_val_00000001.png']
    kept = ['det/epoch_12.pth', 'seg/test/20250101_000000/20250101_000000.json',
            'data/coco/annotations/instances_val.json']
    for relpath in previous + kept:
        (tmp_path / relpath).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relpath).write_text('from the previous run')
    (tmp_path / 'metrics.json').write_text(json.dumps(dict(finished=True, wall_time_s=300.)))
    demo = pipeline.Demo(pipeline.parse_args(['--out-dir', str(tmp_path), '--num-train', '3',
                                              '--num-val', '2']))

    def data_fails():
        raise RuntimeError('the data step failed')

    monkeypatch.setattr(demo, 'make_data', data_fails)
    with pytest.raises(RuntimeError, match='the data step failed'):
        demo.run()
    saved = json.loads((tmp_path / 'metrics.json').read_text())
    assert saved['finished'] is False and saved['steps'] == [] and 'wall_time_s' not in saved
    assert (saved['data']['num_train'], saved['data']['num_val']) == (3, 2)
    assert not any((tmp_path / relpath.split('/')[0]).exists() for relpath in previous[:3])
    assert not (tmp_path / 'det/test/predictions.pkl').exists()
    assert not (tmp_path / 'seg/test/pred_maps').exists()
    assert all((tmp_path / relpath).read_text() == 'from the previous run' for relpath in kept)

    users = tmp_path / 'users'  # no demo ran there: folders of the same names are the user's
    (users / 'vis').mkdir(parents=True)
    (users / 'vis' / 'mine.png').write_text('mine')
    (users / 'summary.md').write_text('mine')
    demo = pipeline.Demo(pipeline.parse_args(['--out-dir', str(users)]))
    monkeypatch.setattr(demo, 'make_data', data_fails)
    with pytest.raises(RuntimeError, match='the data step failed'):
        demo.run()
    assert (users / 'vis' / 'mine.png').read_text() == (users / 'summary.md').read_text() == 'mine'


@pytest.mark.parametrize('argv,error', [
    (['--num-train', '0'], "argument --num-train: must be an integer >= 1, got '0'"),
    (['--num-val', '-2'], "argument --num-val: must be an integer >= 1, got '-2'"),
    (['--seed', '-1'], "argument --seed: must be an integer >= 0, got '-1'"),
    (['--num-vis', 'two'], "argument --num-vis: must be an integer >= 0, got 'two'"),
])
def test_demo_and_toy_data_counts_are_checked_on_the_command_line(argv, error, capsys):
    from mmtwins.demo import pipeline, toy_data
    for parse_args in (pipeline.parse_args, toy_data.parse_args):
        if argv[0] == '--num-vis' and parse_args is toy_data.parse_args:
            argv = ['--size', '31']
            error = "argument --size: must be an integer >= 32, got '31'"
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert error in capsys.readouterr().err


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
    with pytest.raises(InputError, match='share the file name'):
        list_images([str(tmp_path / 'x'), str(tmp_path / 'y')])


def test_infer_refusals_are_one_line_before_any_model_is_built(tmp_path, monkeypatch):
    """tools/infer.py prints its own refusals as one line (exit status 1), not a traceback:
    inputs whose outputs would overwrite each other, and a config that is neither a
    detector's nor a segmentor's (mmpretrain's); no model is built for either."""
    import mmengine.registry

    def no_build(*args, **kwargs):
        raise AssertionError('a model was built')

    monkeypatch.setattr(mmengine.registry.Registry, 'build', no_build)
    for folder in ('x', 'y'):
        (tmp_path / folder).mkdir()
        Image.new('RGB', (8, 8)).save(tmp_path / folder / 'same.png')
    (tmp_path / 'any.pth').write_bytes(b'')
    seg_config, cls_config = project_file(SEG_CONFIG), project_file('configs/twins_svt_s_in1k.py')
    refusals = {
        (seg_config, 'x', 'y'): r"several inputs share the file name\(s\) \['same'\]: their "
                                'outputs would overwrite each other; run them separately$',
        (cls_config, 'x'): r"twins_svt_s_in1k\.py: default_scope is 'mmpretrain'; inference "
                           r"supports detectors \(default_scope='mmdet'\) and segmentors",
    }
    for (config, *folders), message in refusals.items():
        with pytest.raises(SystemExit, match=rf'^infer\.py: error: .*{message}') as err:
            infer_main([config, str(tmp_path / 'any.pth'),
                        *(str(tmp_path / f) for f in folders), '--out-dir', str(tmp_path / 'o')])
        assert '\n' not in str(err.value)
    assert not (tmp_path / 'o').exists()


@pytest.mark.usefixtures('one_torch_thread')
def test_infer_refuses_a_checkpoint_that_does_not_fit_the_config(tmp_path, monkeypatch):
    """mmengine's inferencers load non-strictly (warnings, then predictions of random heads):
    tools/infer.py refuses another config's checkpoint, a backbone's alone and one of other
    shapes, and a missing file before any model is built; nothing is written."""
    import torch
    from mmtwins.deployment import load_model
    det_config, seg_config = project_file(DET_CONFIG), project_file(SEG_CONFIG)
    image, out = tmp_path / 'a.png', tmp_path / 'out'
    Image.new('RGB', (64, 64)).save(image)
    seg = load_model(seg_config).state_dict()
    checkpoints = {
        'segmentor.pth': (det_config, seg, r'14 missing key\(s\) .*, 46 unexpected key\(s\) '
                          r"\['neck\.lateral_convs\.3\.conv\.weight'.*, 4 of another shape"),
        'backbone.pth': (seg_config, {k[len('backbone.'):]: v for k, v in seg.items()
                                      if k.startswith('backbone.')},
                         r"\d+ unexpected key\(s\) \['patch_embeds\.0\.proj\.weight'"),
        'classes.pth': (seg_config, dict(seg, **{'decode_head.conv_seg.weight': torch.zeros(
            5, *seg['decode_head.conv_seg.weight'].shape[1:])}),
                        r'1 of another shape \(checkpoint vs model\) '
                        r"\['decode_head\.conv_seg\.weight \(5, 64, 1, 1\) vs \(4, 64, 1, 1\)'\]"),
    }
    for name, (config, state, detail) in checkpoints.items():
        torch.save({'state_dict': state, 'meta': {}}, tmp_path / name)
        with pytest.raises(SystemExit, match=rf'^infer\.py: error: checkpoint .*{name} does not '
                           rf'fit the model of the config: .*{detail}.* It may be the checkpoint '
                           'of another config'):
            infer_main([config, str(tmp_path / name), str(image), '--out-dir', str(out),
                        '--device', 'cpu'])
    assert not out.exists()
    # the segmentor's own checkpoint (DDP's module. prefix too) loads
    torch.save({'state_dict': {f'module.{k}': v for k, v in seg.items()},
                'meta': dict(dataset_meta=dict(classes=SEG_CLASSES, palette=[(0, 0, 0)] * 4))},
               tmp_path / 'fits.pth')
    written = infer(seg_config, str(tmp_path / 'fits.pth'), [str(image)], str(out), 'cpu')
    assert np.asarray(Image.open(written['pred'][0])).shape == (64, 64)

    def no_build(*args, **kwargs):
        raise AssertionError('the model was built')

    monkeypatch.setattr('mmtwins.demo.inference.Config.fromfile', no_build)
    with pytest.raises(SystemExit, match=r'^infer\.py: error: checkpoint file not found: '
                       r'.*missing\.pth \(no such file\)$'):
        infer_main([seg_config, str(tmp_path / 'missing.pth'), str(image)])


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


def test_the_toy_data_root_itself_may_be_a_link(tmp_path):
    """OUT linked to a scratch disk is written through; only the folders below it may not be
    links."""
    scratch = tmp_path / 'scratch'
    scratch.mkdir()
    (tmp_path / 'toy').symlink_to(scratch, target_is_directory=True)
    make_toy_data(str(tmp_path / 'toy'), num_train=1, num_val=1)
    assert (scratch / 'coco' / '.mmtwins_toy_data').exists()
    assert len(_read_coco(scratch, 'val')['images']) == 1


def test_a_demo_rerun_removes_links_among_the_previous_outputs_not_what_they_lead_to(
        tmp_path, monkeypatch):
    """A previous run's vis/ that is a link (to a folder of the user's) and a dangling
    summary.md link are removed as links; the folder they led to stays as it was."""
    from mmtwins.demo import pipeline
    elsewhere, out = tmp_path / 'elsewhere', tmp_path / 'demo'
    elsewhere.mkdir()
    (elsewhere / 'keep.png').write_text('mine')
    out.mkdir()
    (out / 'vis').symlink_to(elsewhere, target_is_directory=True)
    (out / 'summary.md').symlink_to(tmp_path / 'gone.md')
    (out / 'metrics.json').write_text(json.dumps(dict(finished=True)))
    demo = pipeline.Demo(pipeline.parse_args(['--out-dir', str(out)]))

    def data_fails():
        raise RuntimeError('the data step failed')

    monkeypatch.setattr(demo, 'make_data', data_fails)
    with pytest.raises(RuntimeError, match='the data step failed'):
        demo.run()
    assert not os.path.lexists(out / 'vis') and not os.path.lexists(out / 'summary.md')
    assert (elsewhere / 'keep.png').read_text() == 'mine'


def test_a_checkpoint_that_does_not_fit_is_refused_before_mmengine_loads_any_of_it(
        tmp_path, monkeypatch):
    """mmengine's loader (non-strict, with warnings) never gets a checkpoint that does not fit."""
    import torch
    from mmseg.apis import MMSegInferencer
    from mmtwins.checkpoint import CheckpointError
    from mmtwins.demo.inference import build_inferencer
    loaded = []
    monkeypatch.setattr(MMSegInferencer, '_load_weights_to_model',
                        lambda self, model, ckpt, cfg: loaded.append(ckpt))
    torch.save({'state_dict': {'extra.weight': torch.ones(1)}}, tmp_path / 'other.pth')
    with pytest.raises(CheckpointError, match='other.pth does not fit the model of the config'):
        build_inferencer(project_file(SEG_CONFIG), str(tmp_path / 'other.pth'), 'cpu')
    assert loaded == []
