"""Twins checkpoints of every layout in circulation, converted to mmtwins' and loaded with a report.

mmtwins' own layout is the authors' release (also timm's) except that stage-end LayerNorms live in
``stage_norms.{i}``: the ImageNet classifier's final ``norm`` is ``stage_norms.3``, and the
per-stage ``norm_list.{i}`` of the authors' dense (detection/segmentation) SVT are
``stage_norms.{i}``, whose checkpoints also carry the classifier's unused ``norm``, which is
dropped with the head. Accepted sources:

============  =====================================================================
layout        recognised by
============  =====================================================================
``authors``   ``blocks.{i}.{j}...`` keys (authors' release, timm, mmtwins itself);
              the authors' ImageNet files wrap them as ``{'model': state_dict}``
``mmseg``     ``layers.{i}.{j}...`` + ``position_encodings`` (mmsegmentation 1.x)
``mmpretrain``  ``stages.{i}.{j}...`` + ``position_encodings`` (mmpretrain 1.x)
============  =====================================================================

mmengine checkpoints (``{'state_dict': ...}``), DDP's ``module.`` prefix and whole-model
checkpoints (``backbone.`` prefix, found automatically or given as ``prefix``) are unwrapped.
:func:`convert_state_dict` does the renaming; :func:`load_twins_checkpoint` loads into a model
and reports every key it did not use; :func:`convert_checkpoint` writes a converted file, and
:func:`main` is its command line (``tools/model_converters/twins2mmtwins.py``).
"""
import argparse
import copyreg
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from mmengine.logging import HistoryBuffer, MMLogger, print_log
from torch import nn

from mmtwins.cli import cli_errors

StateDict = Dict[str, torch.Tensor]
LAYOUTS = ('authors', 'mmseg', 'mmpretrain')
HEAD_PREFIXES = ('head.', )


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# --------------------------------------------------------------------------- reading
class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that pickles objects torch's weights-only loader does not allow."""


def _reduce_history_buffer(buffer: HistoryBuffer) -> tuple:
    # mmengine's own pickling adds the class's statistics functions, which pickle as
    # getattr(HistoryBuffer, 'min') etc.; allow-listing getattr would let a checkpoint reach any
    # attribute. The constructor re-registers those functions anyway.
    return HistoryBuffer, (buffer._log_history, buffer._count_history, buffer.max_length)


def allow_mmengine_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read the training checkpoints mmengine writes.

    Only the non-tensor classes of such a checkpoint are allow-listed: the message hub's
    ``HistoryBuffer`` and numpy arrays, dtypes and scalars (object arrays excluded).
    ``HistoryBuffer`` is saved from now on as its constructor arguments, so checkpoints written
    by this process load; older mmengine checkpoints (which pickle ``getattr``) still need
    ``weights_only=False``, e.g. ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for a file you trust.
    """
    copyreg.pickle(HistoryBuffer, _reduce_history_buffer)
    dtypes = [getattr(np.dtypes, name) for name in np.dtypes.__all__ if name != 'ObjectDType']
    torch.serialization.add_safe_globals([
        HistoryBuffer, np.ndarray, np.dtype, np.core.multiarray._reconstruct,
        np.core.multiarray.scalar, *dtypes
    ])


def check_checkpoint_file(path: str) -> None:
    """Fail early, before any model is built, when the checkpoint ``path`` is not a local file
    (a URL, ``scheme://...``, is left to the loader).

    Raises:
        FileNotFoundError: no such local file.
    """
    if '://' not in path and not os.path.isfile(path):
        what = 'a directory, not a file' if os.path.isdir(path) else 'no such file'
        raise FileNotFoundError(f'checkpoint file not found: {path} ({what})')


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint file to CPU with torch's weights-only unpickler.

    Tensors, plain Python containers and the objects of mmengine's training checkpoints
    (:func:`allow_mmengine_checkpoints`) are read. A file that pickles anything else is refused
    with :class:`UnsafeCheckpointError`, not loaded: unpickling it could run code that the
    file carries. ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in the environment loads such a file in
    full (torch's own switch, which mmengine's loaders obey too): for files you trust.

    Raises:
        FileNotFoundError: no such local file.
        UnsafeCheckpointError: the file holds objects the weights-only loader refuses.
        CheckpointError: the file is truncated, damaged or not a PyTorch checkpoint.
    """
    allow_mmengine_checkpoints()
    if '://' in path:
        from mmengine.runner import CheckpointLoader
        return CheckpointLoader.load_checkpoint(path, map_location='cpu')
    check_checkpoint_file(path)
    try:
        # weights_only left to torch's default (True), so that the environment can override it
        return torch.load(path, map_location='cpu')
    except pickle.UnpicklingError as e:
        # torch's line that names a refused object, without its advice on allow-listing; the
        # weights-only loader also reports damaged pickle bytes ('Unsupported operand'), which
        # name none and are a bad file like any other
        refused = [line.strip() for line in str(e).splitlines()
                   if 'GLOBAL' in line or 'but got <class' in line]
        if refused:
            detail = refused[0].split(' Please use')[0]
            raise UnsafeCheckpointError(
                f'checkpoint {path} was not loaded: it pickles objects other than tensors and '
                f'those of mmengine checkpoints, and unpickling them could run code ({detail}). '
                'If you trust the file, load it with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 set, or '
                're-save its state dict alone.') from e
        raise CheckpointError(f'cannot read checkpoint {path}: it is truncated or not a '
                              f'PyTorch checkpoint ({e})') from e
    except Exception as e:  # noqa: BLE001 - any failure to read the file is a bad file
        raise CheckpointError(f'cannot read checkpoint {path}: it is truncated or not a PyTorch '
                              f'checkpoint ({type(e).__name__}: {e})') from e


def unwrap_state_dict(ckpt: dict, prefix: Optional[str] = None) -> Tuple[StateDict, str]:
    """The flat state dict inside ``ckpt`` and the prefix that was stripped from its keys."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'a checkpoint must be a dict, got {type(ckpt).__name__}')
    for wrapper in ('state_dict', 'model'):
        if isinstance(ckpt.get(wrapper), dict):
            ckpt = ckpt[wrapper]
            break
    sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in ckpt.items()
          if isinstance(v, torch.Tensor)}
    if prefix is None:
        prefix = '' if _find_layout(sd) else _guess_prefix(sd)
    elif prefix and not prefix.endswith('.'):
        prefix += '.'  # as mmengine's loaders: 'backbone' means 'backbone.'
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(f'the checkpoint has no tensors under prefix {prefix!r}')
    return sd, prefix


def fitting_state_dict(model: nn.Module, ckpt: dict, source: str) -> StateDict:
    """The state dict of the whole-model checkpoint ``ckpt`` (an mmengine checkpoint or a bare
    state dict; DDP's ``module.`` prefix removed), once it is known to fit ``model`` exactly:
    the same keys, each of the same shape. mmengine's own loaders (and its inferencers) load
    non-strictly and only warn, leaving what does not fit randomly initialised.

    Args:
        model: the built model.
        ckpt: the loaded checkpoint.
        source: where ``ckpt`` comes from (its path), for the message.

    Returns:
        dict: the state dict, ready for ``model.load_state_dict(state)`` (strict).

    Raises:
        CheckpointError: not a dict of tensors; keys missing, unexpected or of another shape
            (the message counts each and names the first of them).
    """
    try:
        state, _ = unwrap_state_dict(ckpt, prefix='')  # keys as they are, but DDP's module.
    except CheckpointError as err:
        raise CheckpointError(f'checkpoint {source}: {err}') from None
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in state.items()
                if k in own and v.shape != own[k].shape]
    misfits = [f'{len(keys)} {kind} {_first(keys)}' for kind, keys in (
        ('missing key(s)', missing), ('unexpected key(s)', unexpected),
        ('of another shape (checkpoint vs model)', reshaped)) if keys]
    if misfits:
        raise CheckpointError(
            f'checkpoint {source} does not fit the model of the config: {", ".join(misfits)}. '
            'It may be the checkpoint of another config, or of a backbone alone: give the '
            'checkpoint that training with this config wrote')
    return state


def _first(keys: List[str], n: int = 5) -> str:
    """The first ``n`` of ``keys`` as a list, ``...`` after it if there are more."""
    return str(keys[:n]) + (' ...' if len(keys) > n else '')


def _guess_prefix(sd: StateDict) -> str:
    for key in sd:
        m = re.match(r'(.*?)(patch_embeds\.0\.)', key)
        if m and m.group(1):
            return m.group(1)
    return ''


# --------------------------------------------------------------------------- converting
def _find_layout(sd: StateDict) -> Optional[str]:
    keys = list(sd)
    has = lambda p: any(k.startswith(p) for k in keys)  # noqa: E731
    if has('blocks.') and has('patch_embeds.'):
        return 'authors'
    if has('layers.') and has('position_encodings.'):
        return 'mmseg'
    if has('stages.') and has('position_encodings.'):
        return 'mmpretrain'
    return None


def detect_layout(sd: StateDict) -> str:
    """Name the layout of a flat Twins state dict (one of :data:`LAYOUTS`)."""
    layout = _find_layout(sd)
    if layout is None:
        sample = ', '.join(sorted(sd)[:5])
        raise CheckpointError('not a Twins checkpoint of a known layout (authors/timm, '
                              f'mmsegmentation 1.x, mmpretrain 1.x); first keys: {sample}')
    return layout


def num_stages(sd: StateDict) -> int:
    """Stages of a flat mmtwins-layout state dict (its highest ``patch_embeds`` index + 1)."""
    return 1 + max(int(m.group(1)) for k in sd
                   for m in [re.match(r'patch_embeds\.(\d+)\.', k)] if m)


def _split_in_proj(sd: StateDict) -> StateDict:
    """mmseg's fused ``attn.attn.in_proj_*`` ([q; k; v]) -> ``attn.q`` and ``attn.kv``."""
    out = {}
    for k, v in sd.items():
        m = re.match(r'(.*)\.attn\.attn\.in_proj_(weight|bias)$', k)
        if m:
            c = v.shape[0] // 3
            out[f'{m.group(1)}.attn.q.{m.group(2)}'] = v[:c]
            out[f'{m.group(1)}.attn.kv.{m.group(2)}'] = v[c:]
        else:
            out[k] = v
    return out


_COMMON_RULES = [
    (r'^patch_embeds\.(\d+)\.projection\.', r'patch_embeds.\1.proj.'),
    (r'^position_encodings\.(\d+)\.proj\.', r'pos_block.\1.proj.0.'),
    (r'\.ffn\.layers\.0\.0\.', '.mlp.fc1.'),
    (r'\.ffn\.layers\.1\.', '.mlp.fc2.'),
]
_RULES: Dict[str, List[Tuple[str, str]]] = {
    'authors': [(r'^norm_list\.(\d+)\.', r'stage_norms.\1.')],
    'mmseg': _COMMON_RULES + [
        (r'^layers\.', 'blocks.'),
        (r'\.attn\.attn\.out_proj\.', '.attn.proj.'),
        (r'^norm_list\.(\d+)\.', r'stage_norms.\1.'),
    ],
    'mmpretrain': _COMMON_RULES + [
        (r'^stages\.', 'blocks.'),
        (r'^norm_after_stage(\d+)\.', r'stage_norms.\1.'),
    ],
}
_PREPROCESS: Dict[str, Callable[[StateDict], StateDict]] = {'mmseg': _split_in_proj}


def convert_state_dict(sd: StateDict, layout: Optional[str] = None) -> Tuple[StateDict, StateDict]:
    """Rename a flat Twins state dict of any supported layout to mmtwins' layout.

    Returns:
        ``(backbone, head)``: the backbone's tensors in mmtwins' names, and, under their own
        names, the tensors only the ImageNet classifier uses: ``head.*``, and the final
        ``norm.*`` where the checkpoint has per-stage norms of its own (the authors' dense SVT
        keeps the classifier's ``norm`` beside its ``norm_list``, unused).
    """
    layout = layout or detect_layout(sd)
    if layout not in _RULES:
        raise CheckpointError(f'unknown layout {layout!r}; expected one of {LAYOUTS}')
    sd = _PREPROCESS.get(layout, dict)(sd)
    last = num_stages(sd) - 1
    backbone, head = {}, {}
    for key, value in sd.items():
        if key.startswith(HEAD_PREFIXES):
            head[key] = value
            continue
        for pattern, repl in _RULES[layout]:
            key = re.sub(pattern, repl, key)
        backbone[key] = value
    per_stage_norms = any(k.startswith('stage_norms.') for k in backbone)
    for key in [k for k in backbone if k.startswith('norm.')]:
        if per_stage_norms:
            head[key] = backbone.pop(key)
        else:  # the classifier's final norm, after the last stage
            backbone[f'stage_norms.{last}.{key[len("norm."):]}'] = backbone.pop(key)
    return backbone, head


def _stage_depths(sd: StateDict) -> Dict[int, int]:
    """Blocks per stage of a state dict in mmtwins' names: ``{stage: depth}``."""
    depths: Dict[int, int] = {}
    for key in sd:
        m = re.match(r'blocks\.(\d+)\.(\d+)\.', key)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            depths[i] = max(depths.get(i, 0), j + 1)
    return depths


def _block_attention(sd: StateDict) -> Dict[str, str]:
    """The attention of each block of a state dict in mmtwins' names: ``{'blocks.i.j': kind}``,
    told apart by the block's attention weights (LSA's ``qkv``; GSA's ``sr``, if it
    sub-samples)."""
    layers: Dict[str, set] = {}
    for key in sd:
        m = re.match(r'(blocks\.\d+\.\d+)\.attn\.(\w+)\.weight$', key)
        if m:
            layers.setdefault(m.group(1), set()).add(m.group(2))
    return {b: 'locally-grouped attention' if 'qkv' in names else 'global sub-sampled attention '
            + ('with' if 'sr' in names else 'without') + ' sub-sampling'
            for b, names in layers.items()}


def describe_variant(sd: StateDict) -> str:
    """A short description of the variant a converted state dict holds, e.g. ``SVT-small``."""
    from mmtwins.models.backbones import PCPVT, SVT
    n = num_stages(sd)
    dims = [sd[f'patch_embeds.{i}.proj.weight'].shape[0] for i in range(n)]
    stage_depths = _stage_depths(sd)
    depths = [stage_depths.get(i, 0) for i in range(n)]
    lsa = any(k.endswith('.attn.qkv.weight') for k in sd)
    for cls in (SVT, PCPVT) if lsa else (PCPVT, ):
        for name, arch in cls.arch_zoo.items():
            if len(name) > 1 and arch['embed_dims'] == dims and arch['depths'] == depths:
                return f'{cls.__name__}-{name}'
    return f"{'SVT' if lsa else 'PCPVT'}-like (embed_dims={dims}, depths={depths})"


# --------------------------------------------------------------------------- loading
@dataclass
class LoadReport:
    """What :func:`load_twins_checkpoint` did. Keys are in mmtwins' names."""
    layout: str
    variant: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    expected_missing: List[str] = field(default_factory=list)
    unused_stage_norms: List[str] = field(default_factory=list)
    unbuilt_stages: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    head: List[str] = field(default_factory=list)
    final_norm: List[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f'loaded {len(self.loaded)} tensors of a {self.variant} checkpoint '
                 f'({self.layout} layout)']
        if self.head:
            lines.append('dropped what only the ImageNet classifier uses: '
                         f'{", ".join(sorted(self.head))}')
        if self.final_norm:
            lines.append("loaded from the ImageNet classifier's final norm (norm.*, after the "
                         f'last stage): {", ".join(self.final_norm)}')
        if self.expected_missing:
            lines.append('not in the checkpoint, trained from scratch as expected (stage-end '
                         f'norms of a dense model): {", ".join(sorted(self.expected_missing))}')
        if self.unused_stage_norms:
            lines.append('not used, as expected (this model has no norm after those stages): '
                         f'{", ".join(sorted(self.unused_stage_norms))}')
        if self.unbuilt_stages:
            stages = sorted({int(k.split('.')[1]) for k in self.unbuilt_stages})
            lines.append(f'not used, as expected (this model does not build stage(s) {stages}): '
                         f'{len(self.unbuilt_stages)} tensors')
        if self.missing:
            lines.append(f'MISSING from the checkpoint: {", ".join(sorted(self.missing))}')
        if self.unexpected:
            lines.append(f'UNEXPECTED in the checkpoint (not used): '
                         f'{", ".join(sorted(self.unexpected))}')
        return '\n'.join(lines)


def load_twins_checkpoint(model: nn.Module,
                          checkpoint: Union[str, os.PathLike, dict],
                          prefix: Optional[str] = None,
                          strict: bool = False,
                          logger: Optional[MMLogger] = None) -> LoadReport:
    """Load Twins weights of any supported layout into an mmtwins backbone.

    Nothing is written into ``model`` unless every tensor that matches a parameter by name also
    matches it in shape, every stage the two share has the same number of blocks and every
    block they share the same attention (LSA or GSA, with or without sub-sampling), so a
    checkpoint of another variant never leaves half-loaded weights. A model built with fewer
    stages (``out_indices``) takes the checkpoint's first stages.

    Args:
        model: a :class:`mmtwins.models.Twins` backbone.
        checkpoint: a file path (or URL mmengine can read) or an already loaded dict.
        prefix: strip this prefix and ignore other keys (e.g. ``'backbone.'`` for a detector's
            checkpoint; a missing final dot is added). By default a whole-model prefix is found
            automatically.
        strict: raise if any parameter is missing or any checkpoint key is unused (the
            classifier's head, the stages the model does not build, and stage-end norms that one
            of checkpoint and model has and the other has not excepted).
        logger: where the report goes (default: the current mmengine logger).

    Raises:
        FileNotFoundError, CheckpointError: unreadable file, unknown layout, another variant.
    """
    if isinstance(checkpoint, os.PathLike):
        checkpoint = os.fspath(checkpoint)
    source = checkpoint if isinstance(checkpoint, str) else 'the given state dict'
    ckpt = read_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    sd, _ = unwrap_state_dict(ckpt, prefix)
    layout = detect_layout(sd)
    backbone, head = convert_state_dict(sd, layout)
    variant = describe_variant(backbone)

    own = model.state_dict()
    wrong = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
             for k, v in backbone.items() if k in own and v.shape != own[k].shape]
    ckpt_depths = _stage_depths(backbone)
    wrong += [f'stage {i}: {ckpt_depths[i]} blocks in the checkpoint, {d} in the model'
              for i, d in sorted(_stage_depths(own).items())
              if i in ckpt_depths and ckpt_depths[i] != d]
    ckpt_attn = _block_attention(backbone)
    wrong += [f'{b}: {ckpt_attn[b]} in the checkpoint, {attn} in the model'
              for b, attn in _block_attention(own).items()
              if b in ckpt_attn and ckpt_attn[b] != attn]
    if wrong:
        raise CheckpointError(
            f'{source} holds a {variant} checkpoint that does not fit this '
            f'{type(model).__name__} (arch {getattr(model, "arch_settings", "?")}); nothing was '
            f'loaded. Mismatches:\n  ' + '\n  '.join(wrong[:10]))
    to_load = {k: v for k, v in backbone.items() if k in own}
    model.load_state_dict(to_load, strict=False)

    absent = [k for k in own if k not in backbone]
    stage_norm = re.compile(r'^stage_norms\.(\d+)\.')
    built = {int(k.split('.')[1]) for k in own if k.startswith('patch_embeds.')}
    stage_of = re.compile(r'^(?:patch_embeds|blocks|pos_block|stage_norms)\.(\d+)\.')
    unused, unbuilt = [], []
    for k in sorted(k for k in backbone if k not in own):
        m = stage_of.match(k)
        (unbuilt if m and int(m.group(1)) not in built else unused).append(k)
    # a stage norm after a stage the model has but does not normalise
    no_norm = [k for k in unused if stage_norm.match(k)]
    # convert_state_dict makes a checkpoint's final norm the last stage's where the checkpoint
    # has no per-stage norms of its own (else the final norm goes with the head)
    mapped = sd.keys() - head.keys()
    final_norm = [k for k in sorted(to_load)
                  if stage_norm.match(k) and 'norm.' + k.rsplit('.', 1)[1] in mapped]
    report = LoadReport(
        layout=layout, variant=variant, loaded=sorted(to_load), final_norm=final_norm,
        missing=[k for k in absent if not stage_norm.match(k)],
        expected_missing=[k for k in absent if stage_norm.match(k)],
        unused_stage_norms=no_norm, unbuilt_stages=unbuilt,
        unexpected=[k for k in unused if k not in no_norm], head=sorted(head))
    print_log(f'{source}: {report.summary()}', logger=logger or 'current')
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(f'strict loading of {source} failed:\n{report.summary()}')
    return report


# --------------------------------------------------------------------------- converting files
def convert_checkpoint(src: str, dst: str, prefix: Optional[str] = None,
                       keep_head: bool = False) -> Tuple[StateDict, dict]:
    """Convert the Twins checkpoint ``src`` (any layout) to mmtwins' names and write
    ``{'state_dict': ..., 'meta': ...}`` to ``dst`` atomically: a failure never leaves a
    half-written ``dst``.

    Returns:
        ``(state_dict, meta)``: what was written; ``meta`` names the source, its layout, variant,
        the prefix that was stripped and the classifier's tensors kept (``keep_head``).

    Raises:
        CheckpointError: not a Twins checkpoint; ``keep_head`` where ``src`` has no head (under
            the prefix), rather than writing a file without one.
    """
    from mmtwins.engine.fileio import atomic_torch_save  # mmtwins.engine imports this module
    sd, prefix = unwrap_state_dict(read_checkpoint(src), prefix)
    layout = detect_layout(sd)
    backbone, head = convert_state_dict(sd, layout)
    if keep_head and not head:
        where = f' under the prefix {prefix!r}' if prefix else ''
        raise CheckpointError(
            f'--keep-head: {src} has no ImageNet head (head.*){where}. A whole classifier '
            "(mmpretrain's ImageClassifier) keeps its head outside the backbone: it loads into "
            "mmpretrain as it is, or convert it without --keep-head for the backbone alone")
    out = {**backbone, **head} if keep_head else backbone
    meta = dict(source=os.path.abspath(src), layout=layout, variant=describe_variant(backbone),
                prefix=prefix, kept_head=sorted(head) if keep_head else [])
    atomic_torch_save({'state_dict': out, 'meta': meta}, dst)
    return out, meta


def main(argv: Optional[List[str]] = None) -> None:
    """``tools/model_converters/twins2mmtwins.py SRC DST [--prefix P] [--keep-head]``."""
    p = argparse.ArgumentParser(
        description="Convert Twins weights of any layout (authors/timm, mmseg 1.x, mmpretrain "
        "1.x) to mmtwins' names, ready for init_cfg=dict(type='Pretrained', checkpoint=DST)")
    p.add_argument('src', help='checkpoint to convert')
    p.add_argument('dst', help='where to write the mmtwins checkpoint')
    p.add_argument('--prefix', default=None,
                   help="take only keys under this prefix, e.g. 'backbone.' (found "
                   'automatically for whole-model checkpoints)')
    p.add_argument('--keep-head', action='store_true',
                   help='keep the ImageNet head (head.weight/head.bias) in the output')
    args = p.parse_args(argv)
    with cli_errors(p.prog, (CheckpointError, OSError)):
        out, meta = convert_checkpoint(args.src, args.dst, args.prefix, args.keep_head)
    kept = meta['kept_head']
    print(f'{args.src}: {meta["variant"]} in the {meta["layout"]} layout -> {args.dst} '
          f'({len(out) - len(kept)} backbone tensors{", head kept" if kept else ""})')
