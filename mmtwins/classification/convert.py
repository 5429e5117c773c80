"""Convert an ImageNet Twins checkpoint WITH its head into an mmpretrain ``ImageClassifier``'s.

    python tools/model_converters/twins2mmpretrain.py SRC DST
    python -m mmtwins.classification.convert SRC DST      # the same

SRC: the authors' release or timm (``patch_embeds...``, ``norm``, ``head``), or an mmpretrain 1.x
or mmtwins classifier (``backbone.*``, ``head.fc.*``). DST holds ``{'state_dict', 'meta'}`` for
the classifier of ``configs/twins_{pcpvt,svt}_{s,b,l}_in1k.py`` (backbone ``mmtwins.PCPVT`` /
``mmtwins.SVT`` with ``norm_after_stage=[False, False, False, True]``, ``GlobalAveragePooling``,
``LinearClsHead``): ``mim test mmtwins CONFIG --checkpoint DST`` evaluates it. The backbone's
renaming is :func:`mmtwins.checkpoint.convert_state_dict`, the same code every loader runs.
"""
import argparse
import os
from typing import Dict

import torch

from mmtwins.checkpoint import (CheckpointError, convert_state_dict, describe_variant,
                                detect_layout, num_stages, read_checkpoint, unwrap_state_dict)
from mmtwins.cli import cli_errors
from mmtwins.engine.fileio import atomic_torch_save

StateDict = Dict[str, torch.Tensor]
# The authors'/timm head -> mmpretrain's LinearClsHead
_HEAD_RENAMES = {'head.weight': 'head.fc.weight', 'head.bias': 'head.fc.bias'}


def classifier_state_dict(ckpt: dict) -> StateDict:
    """An ImageClassifier state dict (``backbone.*`` in mmtwins' names, ``head.fc.*``).

    Raises:
        CheckpointError: not a Twins checkpoint, or one without an ImageNet head.
    """
    flat, _ = unwrap_state_dict(ckpt, prefix='')
    if any(k.startswith('backbone.') for k in flat):  # an mmpretrain / mmtwins classifier
        backbone_src = {k[len('backbone.'):]: v for k, v in flat.items()
                        if k.startswith('backbone.')}
        head = {k: v for k, v in flat.items() if k.startswith('head.fc.')}
    else:
        backbone_src, head = flat, {}
    backbone, plain_head = convert_state_dict(backbone_src, detect_layout(backbone_src))
    head.update({_HEAD_RENAMES[k]: v for k, v in plain_head.items() if k in _HEAD_RENAMES})
    if set(head) != set(_HEAD_RENAMES.values()):
        raise CheckpointError('the checkpoint has no ImageNet head (head.weight/head.bias or '
                              f'head.fc.*), found {sorted(head) or "none"}: it is a backbone '
                              'checkpoint; load it with the backbone init_cfg instead')
    last = num_stages(backbone) - 1
    if f'stage_norms.{last}.weight' not in backbone:
        raise CheckpointError('the checkpoint has no final norm (norm.* / stage_norms.'
                              f'{last}.*), which the ImageNet classifier applies before pooling')
    return {**{f'backbone.{k}': v for k, v in backbone.items()}, **head}


def convert_classifier_checkpoint(src: str, dst: str) -> dict:
    """Convert the ImageNet classifier checkpoint ``src`` and write it to ``dst``.

    ``dst`` holds ``{'state_dict': classifier_state_dict(...), 'meta': meta}``. It is written
    atomically and flushed to disk: a crash leaves the old ``dst`` or the new one, never half.

    Returns:
        dict: the ``meta`` written: ``source`` (absolute path of ``src``), ``variant`` (as
        :func:`mmtwins.checkpoint.describe_variant` names it) and ``num_classes``.

    Raises:
        CheckpointError: as :func:`classifier_state_dict`.
    """
    sd = classifier_state_dict(read_checkpoint(src))
    backbone = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
    meta = dict(source=os.path.abspath(src), variant=describe_variant(backbone),
                num_classes=sd['head.fc.weight'].shape[0])
    atomic_torch_save({'state_dict': sd, 'meta': meta}, dst)
    return meta


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('src', help='ImageNet checkpoint with its head (authors, timm, mmpretrain)')
    p.add_argument('dst', help='where to write the mmpretrain ImageClassifier checkpoint')
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    with cli_errors(p.prog, (CheckpointError, OSError)):
        meta = convert_classifier_checkpoint(args.src, args.dst)
    print(f"{args.src}: {meta['variant']} classifier with {meta['num_classes']} classes "
          f'-> {args.dst}')


if __name__ == '__main__':
    main()
