"""The feed-forward branch of a Twins block, with its pre-norm, computed in token chunks.

The MLP's hidden tensor is ``mlp_ratio`` (4 or 8) times wider than its input: at 512x512 the first
stage's hidden tensor of one image is 64 MB. Materialised whole, it costs memory and, on a CPU,
time: the C library hands allocations that large straight to the kernel and takes them back when
freed, so every forward and backward pass page-faults through fresh zeroed memory again. The
token rows of an MLP (and of the LayerNorm before it) are independent, so :class:`Mlp` runs them
in chunks of ``chunk_rows`` token rows (:data:`CHUNK_ROWS`), whose hidden slices (2-32 MB in fp32
for hidden widths 256-4096) come from the reused heap and are still in cache when the next
operation reads them.

In training, :class:`_ChunkedMlpFunction` keeps only its input and the pre-activation hidden
chunks ``h`` for backward, and recomputes there what it needs of the rest: ``gelu(h)`` (autograd
would keep ``h`` for the GELU and ``gelu(h)`` for ``fc2``, the widest tensor twice; on CPUs with
AVX512-BF16 one pass of :mod:`.gelu`'s kernel gives it with the GELU's gradient) and, when the
block's pre-norm is passed in, the normalised tokens (autograd would keep them for ``fc1`` next to
the norm's own input). With ``recompute_hidden`` it keeps only the input and recomputes ``h``
chunk by chunk too. Values and gradients are those of ``fc2(gelu(fc1(norm(x))))`` up to the
order of floating-point summation, and the same with and without ``recompute_hidden``. On an
x86-64 CPU the fp32 products (and on some CPUs the bf16 ones), forward and backward, run through
oneDNN (:mod:`.linear`): there each forward reorders a weight into oneDNN's layout once for all
its chunks (:class:`.linear.ChunkProducts`), and in inference ``fc1``'s product has the GELU fused
into it, so the pre-activation is never stored.
"""
from typing import List, Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .gelu import gelu, gelu_with_grad
from .graph import is_exporting
from .linear import ChunkProducts, is_plain, linear, linear_grads, no_global_hooks, use_onednn
from .norm import layer_norm

#: Default token rows per chunk. A fixed row count, not a bound on the hidden slice's elements:
#: on an AMD EPYC Zen 4 (2 cores) the training forward and backward of one MLP with its pre-norm
#: were fastest at 2048 rows a chunk, or within 5 % of it, for every width timed (hidden
#: 256-4096, 256-8192 rows), up to 1.3x faster than in the chunks of at most 2**20 hidden
#: elements used before (256-4096 rows); inference took 0.88-1.09x the time
#: (``docs/benchmarks.md``, "MLP chunks of 2048 rows").
CHUNK_ROWS = 2048


def _chunk_rows(chunk_rows: Optional[int], device: torch.device) -> Optional[int]:
    """Token rows per chunk; None means one chunk (on GPUs, whose caching allocator already
    reuses memory and whose kernels want the largest matrices)."""
    return chunk_rows if device.type == 'cpu' else None


def _spans(total: int, rows: Optional[int]):
    rows = rows or max(total, 1)
    return [(s, min(s + rows, total)) for s in range(0, total, rows)]


class _Norm:
    """The pre-norm's parameters, applied row-wise to 2-D chunks in the input's dtype; its
    output is cast to the compute dtype of the linears. ``inference``: no backward will
    recompute it, so :func:`.norm.layer_norm` may take mmtwins' compiled kernel (on some
    CPUs); else PyTorch's, as the backward's recomputation."""

    def __init__(self, weight, bias, eps: float, dtype: torch.dtype, inference: bool = False):
        self.weight, self.bias, self.eps, self.dtype = weight, bias, eps, dtype
        self.inference = inference

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference:
            return _to(layer_norm(x, self.weight, self.bias, self.eps), self.dtype)
        return self.with_stats(x)[0]

    def with_stats(self, x: torch.Tensor):
        """(normalised ``x`` in the compute dtype, mean, rstd), for the norm's backward."""
        y, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return _to(y, self.dtype), mean, rstd


def _mlp_chunks(x: torch.Tensor, norm: Optional[_Norm], w1, b1, w2, b2, rows: Optional[int],
                keep: Optional[List[torch.Tensor]] = None, inference: bool = False
                ) -> torch.Tensor:
    """``fc2(gelu(fc1(norm(x))))`` on 2-D ``x`` (M, C) chunk by chunk, in a forward autograd
    does not record (:class:`.linear.ChunkProducts`: several chunks reorder each weight for
    oneDNN once; in ``inference`` the GELU is fused into ``fc1``'s product, which a backward
    recomputing ``h`` would not reproduce bit for bit); appends each pre-activation ``h`` to
    ``keep``. Several chunks (or none: no rows) write into one output tensor; one chunk returns
    its own."""
    spans = _spans(x.shape[0], rows)
    out = x.new_empty(x.shape[0], w2.shape[0], dtype=w2.dtype) if len(spans) != 1 else None
    fc1, fc2 = (ChunkProducts(w, b, pack=out is not None) for w, b in ((w1, b1), (w2, b2)))
    for s, e in spans:
        xc = x[s:e] if norm is None else norm(x[s:e])
        if inference:
            a = fc1(xc, gelu=True)
        else:
            h = fc1(xc)
            if keep is not None:
                keep.append(h)
            a = gelu(h)
        if out is None:
            return fc2(a)
        fc2(a, out=out[s:e])
    return out


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call where it would return ``t`` (each call costs host time,
    which a launch-bound GPU step waits for)."""
    return t if t.dtype == dtype else t.to(dtype)


def _mlp_forward(x: torch.Tensor, norm_params, params, rows: Optional[int],
                 keep: Optional[List[torch.Tensor]] = None, inference: bool = False):
    """(B, N, C) ``x`` through :func:`_mlp_chunks` in the dtype ``F.linear`` would use.

    ``norm_params`` is ``(weight, bias, eps)`` of the pre-norm; eps None means no norm. Returns
    the 2-D (M, C) tensor that backward needs (``x`` itself with a norm, which then runs in
    ``x``'s dtype as ``F.layer_norm`` would; else ``x`` in the compute dtype) and the output
    (B, N, C_out). ``inference``: no backward follows (see :class:`_Norm` and
    :func:`_mlp_chunks`).
    """
    dev = x.device.type
    autocast = torch.is_autocast_enabled(dev)
    dtype = torch.get_autocast_dtype(dev) if autocast else x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    norm = None if norm_params[2] is None else _Norm(*norm_params, dtype, inference)
    if norm is None:
        x2 = _to(x2, dtype)
    params = [None if p is None else _to(p, dtype) for p in params]
    if autocast:  # the linears compute in ``dtype`` already
        with torch.autocast(dev, enabled=False):
            out = _mlp_chunks(x2, norm, *params, rows, keep, inference)
    else:
        out = _mlp_chunks(x2, norm, *params, rows, keep, inference)
    return x2, out.view(*x.shape[:-1], out.shape[-1])


def _add_product(acc: Optional[torch.Tensor], a: torch.Tensor, b: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """``acc + a @ b`` in ``dtype`` (fp32 or wider: weight gradients summed over chunks); ``acc``
    None (the first chunk) gives the product itself, so one chunk costs one matmul."""
    if acc is None:
        return _to(a.mm(b), dtype)
    if acc.dtype == a.dtype:
        return acc.addmm_(a, b)
    return acc.add_(a.mm(b))


def _add(acc: Optional[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """``acc + t``, or ``t`` for the first chunk (``acc`` None)."""
    return t if acc is None else acc.add_(t)


def _linear_backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, need_x: bool, gw, gb,
                     need_w: bool, need_b: bool, acc_dtype: torch.dtype):
    """One chunk of a linear's backward: ``(g @ w, gw + g.T @ x, gb + g.sum(0))``, each None
    where not needed; ``gw``/``gb`` None (the first chunk) give the chunk's own.

    Shapes:
        g (M, O), x (M, C), w (O, C) -> (M, C), (O, C), (O,).
    """
    if use_onednn(x, w):  # gradients in the compute dtype, summed over chunks in acc_dtype
        gxc, gwc, _ = linear_grads(g, x, w, (need_x, need_w, False))
        gw = _add(gw, _to(gwc, acc_dtype)) if need_w else None
    else:
        gxc = g.mm(w) if need_x else None
        gw = _add_product(gw, g.t(), x, acc_dtype) if need_w else None
    return gxc, gw, _add(gb, g.sum(0, dtype=acc_dtype)) if need_b else None


class _ChunkedMlpFunction(torch.autograd.Function):
    """Differentiable chunked MLP with an optional pre-norm; see the module docstring. Under
    autocast it computes in the autocast dtype, as ``F.linear`` would, and returns gradients in
    the inputs' dtypes. Each gradient is built from the first chunk's result and accumulated
    over the others, so a single chunk (always, on a GPU) launches no more operations than
    autograd's own backward plus the two recomputations (three with ``recompute_hidden``)."""

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, norm_eps, w1, b1, w2, b2, rows, recompute_hidden):
        hidden: List[torch.Tensor] = []
        x2, out = _mlp_forward(x, (norm_w, norm_b, norm_eps), (w1, b1, w2, b2), rows,
                               keep=None if recompute_hidden else hidden)
        ctx.rows, ctx.dtype, ctx.x_dtype, ctx.x_shape = rows, out.dtype, x.dtype, x.shape
        ctx.norm_eps = norm_eps
        ctx.save_for_backward(x2, norm_w, norm_b, w1, b1, w2, *hidden)
        return out

    @staticmethod
    @once_differentiable  # its saved h carries no graph: a second derivative would be wrong
    def backward(ctx, grad):
        x2, norm_w, norm_b, w1, b1, w2, *hidden = ctx.saved_tensors
        dtype = ctx.dtype
        need_x, need_nw, need_nb, _, need_w1, need_b1, need_w2, need_b2 = \
            ctx.needs_input_grad[:8]
        norm = None if ctx.norm_eps is None else _Norm(norm_w, norm_b, ctx.norm_eps, dtype)
        need_nw, need_nb = norm is not None and need_nw, norm is not None and need_nb
        need_y = need_x or need_nw or need_nb
        g = _to(grad.reshape(-1, grad.shape[-1]), dtype)
        w1c, w2c = _to(w1, dtype), _to(w2, dtype)
        b1c = None if hidden or b1 is None else _to(b1, dtype)
        acc_dtype = torch.promote_types(dtype, torch.float32)  # fp32 sums, fp64 stays fp64
        spans = _spans(x2.shape[0], ctx.rows)
        # several chunks write their input gradients into one tensor; one chunk returns its own
        gx = torch.empty_like(x2) if need_x and len(spans) != 1 else None
        gw1 = gb1 = gw2 = gb2 = gnw = gnb = None
        for i, (s, e) in enumerate(spans):
            if norm is None:
                xc = x2[s:e]
            else:
                xc, mean, rstd = norm.with_stats(x2[s:e])
            h = hidden[i] if hidden else linear(xc, w1c, b1c)
            gc = g[s:e]
            # fc2's input gradient first (h stands in for gelu(h), of its shape and dtype: only
            # the route reads it), so gelu(h) and the GELU's gradient come from one pass
            ga = _linear_backward(gc, h, w2c, True, None, None, False, False, acc_dtype)[0]
            a, gh = gelu_with_grad(ga, h)
            _, gw2, gb2 = _linear_backward(gc, a, w2c, False, gw2, gb2, need_w2, need_b2,
                                           acc_dtype)
            gxc, gw1, gb1 = _linear_backward(gh, xc, w1c, need_y, gw1, gb1, need_w1, need_b1,
                                             acc_dtype)
            if not need_y:
                continue
            if norm is not None:
                gxc, gnwc, gnbc = torch.ops.aten.native_layer_norm_backward(
                    _to(gxc, x2.dtype), x2[s:e], x2.shape[-1:], mean, rstd, norm_w,
                    norm_b, [need_x, need_nw, need_nb])
                gnw = _add(gnw, _to(gnwc, acc_dtype)) if need_nw else None
                gnb = _add(gnb, _to(gnbc, acc_dtype)) if need_nb else None
            if gx is not None:
                gx[s:e] = gxc
            elif need_x:
                gx = gxc
        if gx is not None:
            gx = _to(gx, ctx.x_dtype).view(ctx.x_shape)

        def cast(t, like):
            return None if t is None else _to(t, like.dtype)

        return (gx, cast(gnw, norm_w), cast(gnb, norm_b), None, cast(gw1, w1), cast(gb1, w1),
                cast(gw2, w2), cast(gb2, w2), None, None)


def _plain_layers(mlp: 'Mlp', norm: Optional[nn.Module]) -> bool:
    """True where the chunked path may stand in for ``mlp``'s layers (and the pre-norm): it
    reads the weights of ``fc1``, ``fc2`` and the norm, computes the exact GELU and skips
    ``drop1``, so each must be exactly ``nn.Linear``, ``nn.GELU(approximate='none')``,
    ``nn.Dropout`` or ``nn.LayerNorm``, and no module hook, its own or global, may be set."""
    if not no_global_hooks():
        return False
    layers = [(mlp.fc1, nn.Linear), (mlp.act, nn.GELU), (mlp.drop1, nn.Dropout),
              (mlp.fc2, nn.Linear)]
    if norm is not None:
        layers.append((norm, nn.LayerNorm))
    return all(is_plain(m, cls) for m, cls in layers) and mlp.act.approximate == 'none'


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout, on (B, N, C) tokens.

    Args:
        dim (int): Input and output channels C.
        hidden_dim (int): Hidden channels.
        drop (float): Dropout after the GELU and after ``fc2``.
        chunk_rows (int, optional): Token rows per chunk; None computes the hidden tensor
            whole. On CPU only (see the module docstring).
        recompute_hidden (bool): In training, keep only the input for backward and recompute
            each chunk's pre-activation hidden slice there (one more ``fc1`` product per
            chunk), so at most one chunk's hidden slice is alive in backward. Set by the
            backbone's ``with_cp``: inside a checkpointed block the hidden tensor is otherwise
            the largest thing the recomputed forward keeps.

    The chunked path reads the weights of ``fc1``, ``fc2`` and the pre-norm and calls none of
    them, and its backward is once differentiable (a second derivative, as in a gradient
    penalty, raises). It is used unless hidden dropout is active in training, a graph is being
    recorded for export, or one of the layers it stands in for is not the plain ``nn.Linear``,
    exact ``nn.GELU``, ``nn.Dropout`` or ``nn.LayerNorm`` or has module hooks, forward or
    backward, its own or global (another activation; quantised, LoRA-wrapped, pruned or hooked
    layers), which all get the plain composition of the modules.

    Shapes:
        (B, N, C) -> (B, N, C).
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.,
                 chunk_rows: Optional[int] = CHUNK_ROWS, recompute_hidden: bool = False):
        super().__init__()
        # Named fc1/fc2 as in the authors' release.
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f'chunk_rows must be a positive row count or None, got {chunk_rows}')
        self.chunk_rows = chunk_rows
        self.recompute_hidden = recompute_hidden

    def forward(self, x: torch.Tensor, norm: Optional[nn.LayerNorm] = None) -> torch.Tensor:
        """``mlp(norm(x))``: a block's pre-norm passed as ``norm`` runs inside the chunks, so the
        normalised tokens are never materialised whole nor kept for backward."""
        if (is_exporting() or (self.training and self.drop1.p > 0)
                or not _plain_layers(self, norm)):
            x = x if norm is None else norm(x)
            return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
        rows = _chunk_rows(self.chunk_rows, x.device)
        params = (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        norm_params = (None, None, None)
        if norm is not None:
            norm_params = (norm.weight, norm.bias, norm.eps)
        if torch.is_grad_enabled() and (x.requires_grad or any(
                p is not None and p.requires_grad for p in params + norm_params[:2])):
            return self.drop2(_ChunkedMlpFunction.apply(x, *norm_params, *params, rows,
                                                        self.recompute_hidden))
        return self.drop2(_mlp_forward(x, norm_params, params, rows, inference=True)[1])
