"""Twins-PCPVT and Twins-SVT backbones with multi-scale outputs.

One network class, :class:`Twins`, builds every variant: each block's attention is chosen from the
arch spec (a stage's ``window_sizes`` entry turns its even-indexed blocks into locally-grouped
attention; every other block is global sub-sampled attention). :class:`PCPVT` and :class:`SVT` only
carry their variant tables and defaults.
"""
import functools
import math
import numbers
import operator
import os
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint as cp
from mmengine.logging import MMLogger
from mmengine.model import BaseModule, initialize
from torch import nn

from mmtwins.registry import MODELS
from ..layers import PatchEmbed, PositionEncodingGenerator, TwinsBlock
from ..layers.block import NORM_EPS
from ..layers.embed import conv_fan_out_init_, tokens_to_map
from ..layers.graph import is_exporting
from ..layers.norm import apply_norm

ARCH_KEYS = ('embed_dims', 'num_heads', 'mlp_ratios', 'depths', 'sr_ratios', 'window_sizes')
PATCH_SIZES = (4, 2, 2, 2)


class Twins(BaseModule):
    """Twins backbone: four stages of patch embedding, transformer blocks and a PEG.

    Args:
        arch (str | dict): A variant name from ``arch_zoo`` (``'small'``, ``'s'``, ...) or a
            dict with the keys of :data:`ARCH_KEYS`, each a sequence with one entry per stage
            (``window_sizes`` entries are an int or ``None`` for a stage of only global attention;
            :class:`PCPVT` lets the key be left out, meaning all ``None``, :class:`SVT` does not).
        in_channels (int): Channels of the input images.
        out_indices (int | Sequence[int], optional): Stages whose feature maps are returned, in
            increasing order (negative indices count from the last stage); by default every
            stage. Stages after the last of them are not built, so every parameter is used (DDP
            needs no ``find_unused_parameters``).
        norm_after_stage (bool | Sequence[bool]): A LayerNorm (eps 1e-6) at the end of each
            stage (all, or per stage). The authors' dense SVT has it on every stage; an ImageNet
            classifier has it on the last stage only (the authors' final ``norm``).
        drop_rate (float): Dropout after each patch embedding, the MLPs' GELU and the attention
            and MLP output projections (the authors' ``drop_rate``).
        attn_drop_rate (float): Dropout on attention weights.
        drop_path_rate (float): Stochastic depth, increasing linearly over all blocks of the
            arch up to this value (also over stages that ``out_indices`` leaves unbuilt, so a
            built block keeps the rate it has in the whole network); applied once per residual
            branch.
        frozen_stages (int): Stages ``0..frozen_stages``, each with its patch embedding, PEG
            and stage norm, are frozen (eval mode, no gradient); -1 freezes nothing. Counted as
            in mmpretrain's backbones: mmdet's ResNet and Swin freeze their stem and
            ``frozen_stages`` stages, so their ``frozen_stages=k`` is ``k - 1`` here.
        with_cp (bool): Gradient checkpointing (less memory, more compute): each patch
            embedding and each block, with its stage's PEG and norm, keeps only its input for
            backward and runs again there; the blocks' MLPs also recompute their hidden
            activations in backward, chunk by chunk (see :class:`~mmtwins.models.layers.Mlp`).
        init_cfg (dict | list[dict], optional): mmengine initialisers, applied after the
            authors' random init. ``dict(type='Pretrained', checkpoint=PATH[, prefix=...])``
            loads weights of any supported layout through
            :func:`mmtwins.checkpoint.load_twins_checkpoint` (last, as mmengine applies
            ``Pretrained``); parameters the checkpoint lacks keep the authors' init.

    Shapes:
        (B, in_channels, H, W) with H, W >= :attr:`min_input_size` -> a tuple with one
        (B, embed_dims[i], ceil(H / s_i), ceil(W / s_i)) map per ``out_indices`` entry, where
        s_i = 4, 8, 16, 32. The maps are channels-last views of the stage tokens (no copy):
        while gradients are recorded, change them out of place (an in-place op raises).
    """
    arch_zoo: Dict[str, dict] = {}
    default_norm_after_stage = False

    def __init__(self,
                 arch: Union[str, dict] = 'small',
                 in_channels: int = 3,
                 out_indices: Optional[Union[int, Sequence[int]]] = None,
                 norm_after_stage: Optional[Union[bool, Sequence[bool]]] = None,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 frozen_stages: int = -1,
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None):
        _init_cfgs(init_cfg)
        super().__init__(init_cfg=init_cfg)
        self.arch_settings = self._resolve_arch(arch)
        s = self.arch_settings
        num_stages = len(s['depths'])
        self.out_indices = self._check_out_indices(
            range(num_stages) if out_indices is None else out_indices, num_stages)
        built = self.out_indices[-1] + 1
        if norm_after_stage is None:
            norm_after_stage = self.default_norm_after_stage
        if isinstance(norm_after_stage, bool):
            norm_after_stage = [norm_after_stage] * num_stages
        if (not isinstance(norm_after_stage, Sequence) or len(norm_after_stage) != num_stages
                or not all(isinstance(v, bool) for v in norm_after_stage)):
            raise ValueError('norm_after_stage must be a bool or a sequence of one bool per '
                             f'stage ({num_stages}), got {norm_after_stage!r}')
        if not -1 <= frozen_stages < built:
            raise ValueError(f'frozen_stages must be in [-1, {built - 1}] (the stages built '
                             f'for out_indices {self.out_indices}), got {frozen_stages}')
        self.in_channels = in_channels
        self.frozen_stages = frozen_stages
        self.embed_dims = tuple(s['embed_dims'][:built])
        self.strides = tuple(math.prod(PATCH_SIZES[:i + 1]) for i in range(built))

        dpr = torch.linspace(0, drop_path_rate, sum(s['depths'])).tolist()
        self.patch_embeds = nn.ModuleList()
        self.blocks = nn.ModuleList()
        self.pos_block = nn.ModuleList()
        self.stage_norms = nn.ModuleDict()
        prev_dim, cur = in_channels, 0
        for i in range(built):
            dim, ws = s['embed_dims'][i], s['window_sizes'][i]
            self.patch_embeds.append(PatchEmbed(prev_dim, dim, PATCH_SIZES[i], drop=drop_rate))
            self.blocks.append(nn.ModuleList([
                TwinsBlock(dim, s['num_heads'][i], s['mlp_ratios'][i], s['sr_ratios'][i],
                           window_size=ws if ws and j % 2 == 0 else None, drop=drop_rate,
                           attn_drop=attn_drop_rate, drop_path=dpr[cur + j])
                for j in range(s['depths'][i])
            ]))
            self.pos_block.append(PositionEncodingGenerator(dim))
            if norm_after_stage[i]:
                self.stage_norms[str(i)] = nn.LayerNorm(dim, eps=NORM_EPS)
            prev_dim, cur = dim, cur + s['depths'][i]
        self.with_cp = with_cp
        self.min_input_size = self._min_input_size()
        self._freeze_stages()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def _resolve_arch(cls, arch: Union[str, dict]) -> dict:
        if isinstance(arch, str):
            key = arch.lower()
            if key not in cls.arch_zoo:
                names = sorted(cls.arch_zoo)
                raise ValueError(f'{cls.__name__}: unknown arch {arch!r}; choose one of {names} '
                                 'or pass a dict of custom settings')
            return cls.arch_zoo[key]
        if not isinstance(arch, dict):
            raise TypeError(f'{cls.__name__}: arch must be a str or dict, got {type(arch)}')
        return validate_arch(arch)

    @staticmethod
    def _check_out_indices(out_indices, num_stages: int) -> Tuple[int, ...]:
        """Stage indices, negative ones counted from the end; increasing, without repeats."""
        given = (out_indices, ) if isinstance(out_indices, numbers.Integral) else out_indices
        try:
            idx = tuple(i + num_stages if i < 0 else i for i in map(operator.index, given))
        except TypeError:
            idx = ()
        if (not idx or idx[0] < 0 or idx[-1] >= num_stages
                or any(a >= b for a, b in zip(idx, idx[1:]))):
            raise ValueError(f'out_indices must be increasing stage indices in '
                             f'{-num_stages}..{num_stages - 1} without repeats, '
                             f'got {out_indices!r}')
        return idx

    def _min_input_size(self) -> int:
        """Smallest side for which every GSA sub-sampling conv still sees one whole window.

        Only stages with a GSA block count: an LSA-only stage (one block, with a window) has
        no sub-sampling conv."""
        s = self.arch_settings
        return max([1] + [stride * (sr - 1) + 1 for stride, sr, ws, depth in zip(
            self.strides, s['sr_ratios'], s['window_sizes'], s['depths']) if not ws or depth > 1])

    # ------------------------------------------------------------------ weights
    def init_weights(self) -> None:
        """The authors' random init, then ``init_cfg``'s initialisers, ``Pretrained`` last."""
        from mmtwins.checkpoint import load_twins_checkpoint
        self._authors_init()
        cfgs = _init_cfgs(self.init_cfg)
        others = [c for c in cfgs if c['type'] != 'Pretrained']
        if others:
            initialize(self, others)
        for cfg in cfgs:
            if cfg['type'] == 'Pretrained':
                load_twins_checkpoint(self, cfg['checkpoint'], prefix=cfg.get('prefix'),
                                      logger=MMLogger.get_current_instance())
        self._is_init = True

    def _authors_init(self) -> None:
        """trunc_normal(0.02) linears, unit LayerNorms, fan-out normal convs; zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                conv_fan_out_init_(m)

    # ------------------------------------------------------------------ freezing
    def _stage_modules(self, i: int):
        mods = [self.patch_embeds[i], self.blocks[i], self.pos_block[i]]
        if str(i) in self.stage_norms:
            mods.append(self.stage_norms[str(i)])
        return mods

    def _freeze_stages(self) -> None:
        for i in range(self.frozen_stages + 1):
            for m in self._stage_modules(i):
                m.eval()
                for p in m.parameters():
                    p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        return self

    @property
    def with_cp(self) -> bool:
        return self._with_cp

    @with_cp.setter
    def with_cp(self, value: bool) -> None:
        self._with_cp = value
        for blocks in self.blocks:
            for blk in blocks:
                blk.mlp.recompute_hidden = value

    # ------------------------------------------------------------------ forward
    def _check_input(self, x) -> None:
        """Raise a ``TypeError``/``ValueError`` naming what is wrong with an input batch.

        Pixel values are not inspected: a finiteness check would synchronise the device every
        step. Non-finite pixels propagate to the outputs of their own image only (no operation
        mixes images); in training, :class:`mmtwins.engine.NonFiniteLossHook` catches them.
        While a graph is recorded for export only the type checks run: sizes are graph values
        then, and no check on them is baked into the graph.
        """
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'{name} expects a torch.Tensor, got {type(x)}')
        if not x.is_floating_point():
            raise TypeError(f'{name} expects a floating-point tensor, got {x.dtype}')
        weight = self.patch_embeds[0].proj.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f'{name} has {weight.dtype} parameters but got a {x.dtype} input: '
                            f'cast the input (x.to({weight.dtype})) or the model, or run under '
                            'torch.autocast')
        if x.dim() != 4:
            raise ValueError(f'{name} expects a 4-D (B, C, H, W) tensor, got shape '
                             f'{tuple(x.shape)}')
        if is_exporting():
            return
        if x.shape[1] != self.in_channels:
            raise ValueError(f'{name} was built for {self.in_channels} input channels, got '
                             f'{x.shape[1]} (shape {tuple(x.shape)})')
        if x.shape[0] == 0:
            raise ValueError(f'{name} got an empty batch (shape {tuple(x.shape)})')
        if min(x.shape[2:]) < self.min_input_size:
            raise ValueError(f'{name}: input of {x.shape[2]}x{x.shape[3]} is too small; height '
                             f'and width must be >= {self.min_input_size}')

    def _stage_segment(self, i: int, j: int, x: torch.Tensor, hw) -> torch.Tensor:
        """Block ``j`` of stage ``i`` with the stage's PEG (which follows its first block) and
        norm (after its last block, if any): the unit of gradient checkpointing.

        The PEG runs at the start of the second block's segment, so its input, the first
        block's output, is what that segment keeps, and its backward runs after the second
        block's has released that block's tensors; in a stage of one block it ends the first.
        """
        peg, blocks = self.pos_block[i], self.blocks[i]
        if j == 1:
            x = peg(x, hw)
        x = blocks[j](x, hw)
        if len(blocks) == 1:
            x = peg(x, hw)
        if j == len(blocks) - 1 and str(i) in self.stage_norms:
            x = apply_norm(self.stage_norms[str(i)], x)
        return x

    def _checkpointed(self, fn, x: torch.Tensor):
        """``fn(x)``; with ``with_cp`` and gradients recorded, under gradient checkpointing: only
        ``x`` is kept for backward, and ``fn`` runs again there."""
        if self.with_cp and torch.is_grad_enabled():
            return cp.checkpoint(fn, x, use_reentrant=False)
        return fn(x)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        self._check_input(x)
        outs = []
        for i, embed in enumerate(self.patch_embeds):
            # The stage's tokens reach the next stage and the outputs through separate map
            # views, so their gradients are summed as tokens (see tokens_to_map).
            x, hw = self._checkpointed(
                embed, x if i == 0 else tokens_to_map(x, hw, self.embed_dims[i - 1]))
            for j in range(len(self.blocks[i])):
                x = self._checkpointed(functools.partial(self._stage_segment, i, j, hw=hw), x)
            if i in self.out_indices:
                outs.append(tokens_to_map(x, hw, self.embed_dims[i]))
        return tuple(outs)


def _init_cfgs(init_cfg) -> list:
    """``init_cfg`` as a list of initialiser dicts (None: none), each checked to name a ``type``
    and, for ``Pretrained``, a ``checkpoint`` path: a misspelt one fails when the model is
    built rather than at ``init_weights``."""
    cfgs = [] if init_cfg is None else init_cfg if isinstance(init_cfg, list) else [init_cfg]
    for cfg in cfgs:
        if not isinstance(cfg, dict) or 'type' not in cfg:
            raise TypeError(f'init_cfg must be a dict with a "type" or a list of them, got '
                            f'{init_cfg!r}')
        if cfg['type'] == 'Pretrained' and not isinstance(cfg.get('checkpoint'),
                                                          (str, os.PathLike)):
            raise ValueError("init_cfg of type 'Pretrained' needs a checkpoint path "
                             f"(checkpoint=...), got {cfg!r}")
    return cfgs


def validate_arch(arch: dict) -> dict:
    """Check a custom arch dict and return it completed (``window_sizes`` defaults to None).

    Raises:
        ValueError: naming the missing, unknown or inconsistent key.
    """
    arch = dict(arch)
    if isinstance(arch.get('depths'), Sequence):
        arch.setdefault('window_sizes', [None] * len(arch['depths']))
    unknown = sorted(set(arch) - set(ARCH_KEYS))
    if unknown:
        raise ValueError(f'custom arch has unknown key(s) {unknown}; allowed: {list(ARCH_KEYS)}')
    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise ValueError(f'custom arch is missing key(s) {missing}')
    for k in ARCH_KEYS:
        if isinstance(arch[k], (str, bytes)) or not isinstance(arch[k], Sequence):
            raise ValueError(f'custom arch key {k!r} must be a list with one entry per stage, '
                             f'got {arch[k]!r}')
    n = len(arch['depths'])
    if not 1 <= n <= len(PATCH_SIZES):
        raise ValueError(f"custom arch key 'depths' must have 1 to {len(PATCH_SIZES)} entries, "
                         f'got {n}')
    for k in ARCH_KEYS:
        if len(arch[k]) != n:
            raise ValueError(f'custom arch key {k!r} has {len(arch[k])} entries but depths has '
                             f'{n}: every key needs one entry per stage')
    for k in ('embed_dims', 'num_heads', 'depths', 'sr_ratios'):
        if not all(_is_positive_int(v) for v in arch[k]):
            raise ValueError(f'custom arch key {k!r} must hold positive ints, got {arch[k]}')
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0
               for v in arch['mlp_ratios']):
        raise ValueError("custom arch key 'mlp_ratios' must hold positive numbers, got "
                         f"{arch['mlp_ratios']}")
    if not all(ws is None or _is_positive_int(ws) for ws in arch['window_sizes']):
        raise ValueError("custom arch key 'window_sizes' must hold positive ints or None, got "
                         f"{arch['window_sizes']}")
    for i, (dim, heads) in enumerate(zip(arch['embed_dims'], arch['num_heads'])):
        if dim % heads:
            raise ValueError(f"custom arch key 'embed_dims': stage {i} dim {dim} is not "
                             f"divisible by its 'num_heads' {heads}")
    return {k: list(arch[k]) for k in ARCH_KEYS}


def _is_positive_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0


def _arch(embed_dims, num_heads, mlp_ratios, depths, window_size=None):
    return dict(embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios, depths=depths,
                sr_ratios=[8, 4, 2, 1], window_sizes=[window_size] * 4)


def _with_aliases(zoo: dict) -> dict:
    return {**zoo, **{name[0]: cfg for name, cfg in zoo.items()}}


@MODELS.register_module()
class PCPVT(Twins):
    """Twins-PCPVT: every block is global sub-sampled attention. See :class:`Twins`.

    ``arch``: ``'small'|'s'``, ``'base'|'b'``, ``'large'|'l'`` or a custom dict.
    """
    arch_zoo = _with_aliases({
        'small': _arch([64, 128, 320, 512], [1, 2, 5, 8], [8, 8, 4, 4], [3, 4, 6, 3]),
        'base': _arch([64, 128, 320, 512], [1, 2, 5, 8], [8, 8, 4, 4], [3, 4, 18, 3]),
        'large': _arch([64, 128, 320, 512], [1, 2, 5, 8], [8, 8, 4, 4], [3, 8, 27, 3]),
    })


@MODELS.register_module()
class SVT(Twins):
    """Twins-SVT: blocks alternate LSA (even index) and GSA (odd index). See :class:`Twins`.

    ``arch``: ``'small'|'s'``, ``'base'|'b'``, ``'large'|'l'`` or a custom dict. As in the
    authors' dense-prediction models, a LayerNorm ends every stage by default.
    """
    default_norm_after_stage = True
    arch_zoo = _with_aliases({
        'small': _arch([64, 128, 256, 512], [2, 4, 8, 16], [4, 4, 4, 4], [2, 2, 10, 4], 7),
        'base': _arch([96, 192, 384, 768], [3, 6, 12, 24], [4, 4, 4, 4], [2, 2, 18, 2], 7),
        'large': _arch([128, 256, 512, 1024], [4, 8, 16, 32], [4, 4, 4, 4], [2, 2, 18, 2], 7),
    })

    @classmethod
    def _resolve_arch(cls, arch: Union[str, dict]) -> dict:
        """As :meth:`Twins._resolve_arch`, but a custom dict must give ``window_sizes``: left
        out, it would mean global attention only, PCPVT's design, not SVT's."""
        resolved = super()._resolve_arch(arch)  # a misspelt key is named as unknown first
        if isinstance(arch, dict) and 'window_sizes' not in arch:
            raise ValueError(
                "SVT: custom arch is missing key 'window_sizes': one entry per stage, the window "
                'side of its locally-grouped attention blocks (7 in every stage of the paper), '
                'or None for a stage of only global attention')
        return resolved
