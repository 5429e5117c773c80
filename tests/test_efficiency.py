"""The speed and memory levers change nothing but speed and memory: same values, same gradients."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.utils import prune
from conftest import TINY_PCPVT, TINY_SVT, projected_loss
from probes import CountOps

from mmtwins.analysis.peers import build_impl, saved_tensor_mb

# One thread: these small ops gain nothing from two, and on a loaded 2-core machine a second
# thread waiting for a core made a test's computation 10-50x slower (measured).
pytestmark = pytest.mark.usefixtures('one_torch_thread')
from mmtwins.models.layers import Mlp
from mmtwins.models.layers.mlp import CHUNK_ROWS, _ChunkedMlpFunction

# Chunks of 7 token rows: 2 x 10 tokens run as 7 + 7 + 6 rows; None computes the hidden tensor
# whole.
CHUNKINGS = [7, None]


def _mlp(chunk_rows, norm: bool):
    """An MLP of 16 -> 64 -> 16 channels and, if ``norm``, a pre-norm with non-trivial affine
    parameters (a block's ``norm2``), or None."""
    mlp = Mlp(16, 64, chunk_rows=chunk_rows)
    if not norm:
        return mlp, None
    ln = torch.nn.LayerNorm(16, eps=1e-6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    return mlp, ln


def _grads(mlp, x, plain: bool, autocast: bool = False, norm=None):
    """Output, input gradient and the parameter gradients (the norm's last) of
    ``mlp(norm(x))``, through the chunked path or, if ``plain``, the plain composition."""
    params = list(mlp.parameters()) + ([] if norm is None else list(norm.parameters()))
    for p in params:
        p.grad = None
    x = x.clone().requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        if plain:
            y = mlp.fc2(mlp.act(mlp.fc1(x if norm is None else norm(x))))
        else:
            y = mlp(x, norm=norm)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return [y.detach()] + [x.grad] + [p.grad.clone() for p in params]


NORMS = [False, True]
NORM_IDS = ['no-norm', 'pre-norm']


@pytest.mark.parametrize('norm', NORMS, ids=NORM_IDS)
@pytest.mark.parametrize('chunk_rows', CHUNKINGS)
def test_chunked_mlp_matches_the_plain_composition_in_fp32(chunk_rows, norm):
    torch.manual_seed(0)
    (mlp, ln), x = _mlp(chunk_rows, norm), torch.randn(2, 10, 16)
    ours, plain = _grads(mlp, x, False, norm=ln), _grads(mlp, x, True, norm=ln)
    assert len(ours) == len(plain) == 6 + 2 * norm
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        xn = x if ln is None else ln(x)
        torch.testing.assert_close(mlp(x, norm=ln), mlp.fc2(mlp.act(mlp.fc1(xn))),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('norm', NORMS, ids=NORM_IDS)
@pytest.mark.parametrize('chunk_rows', CHUNKINGS)
def test_chunked_mlp_in_fp64_sums_its_gradients_in_fp64(chunk_rows, norm):
    torch.manual_seed(0)
    mlp, ln = _mlp(chunk_rows, norm)
    mlp, ln = mlp.double(), ln if ln is None else ln.double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    for ours, plain in zip(_grads(mlp, x, False, norm=ln), _grads(mlp, x, True, norm=ln)):
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('norm', NORMS, ids=NORM_IDS)
@pytest.mark.parametrize('chunk_rows', CHUNKINGS)
def test_chunked_mlp_under_bf16_autocast_keeps_dtypes_and_fp32_accuracy(chunk_rows, norm):
    """Autocast dtypes as F.linear's (and F.layer_norm's); weight gradients summed over chunks
    in fp32, so they are no further from the fp32 gradients than autocast's own ones."""
    torch.manual_seed(0)
    (mlp, ln), x = _mlp(chunk_rows, norm), torch.randn(2, 10, 16)
    ours = _grads(mlp, x, plain=False, autocast=True, norm=ln)
    plain = _grads(mlp, x, plain=True, autocast=True, norm=ln)
    ref = _grads(mlp, x, plain=True, norm=ln)
    assert len(ours) == len(plain) == len(ref) == 6 + 2 * norm
    for a, b, r in zip(ours, plain, ref):
        assert a.dtype == b.dtype
        scale = r.abs().max().item()
        assert (a.float() - r).abs().max().item() <= max(
            (b.float() - r).abs().max().item(), 0.01 * scale)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        y = mlp(x, norm=ln)
        y_plain = mlp.fc2(mlp.act(mlp.fc1(x if ln is None else ln(x))))
    assert y.dtype == y_plain.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_plain)


def _uses_chunks(mlp, x, norm=None) -> bool:
    """Whether ``mlp(x, norm)`` ran as the chunked function (in eval mode: no dropout)."""
    mlp.eval()
    grad_fn = mlp(x.clone().requires_grad_(), norm=norm).grad_fn
    mlp.train()
    return type(grad_fn) is _ChunkedMlpFunction._backward_cls


@pytest.mark.filterwarnings('ignore:torch.quantize_per_tensor:UserWarning')  # torch's own
def test_hooked_or_replaced_layers_take_the_plain_composition():
    """The chunked path reads fc1/fc2/norm's weights without calling them and computes the
    exact GELU in place of act: a hook (forward or backward, the layer's own or global) on any
    of them or on drop1, another activation, pruning, dynamic quantisation or mmpretrain's
    LoRA would be skipped or broken by it, so those get the plain composition of the modules."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 16)
    mlp, ln = _mlp(7, norm=True)
    assert _uses_chunks(mlp, x, ln)
    calls = []
    for layer in (mlp.fc1, mlp.act, mlp.drop1, mlp.fc2, ln):
        handle = layer.register_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
        assert not _uses_chunks(mlp, x, ln)
        handle.remove()
    assert calls == ['Linear', 'GELU', 'Dropout', 'Linear', 'LayerNorm']
    class Scaled(torch.nn.Linear):  # a subclass may compute otherwise: not a plain linear
        def forward(self, x):
            return 2 * super().forward(x)

    fc2, mlp.fc2 = mlp.fc2, Scaled(64, 16)
    assert not _uses_chunks(mlp, x, ln)
    mlp.fc2 = fc2
    gelu = mlp.act
    for act in (torch.nn.ReLU(), torch.nn.GELU(approximate='tanh')):
        mlp.act = act
        assert not _uses_chunks(mlp, x, ln)
        with torch.no_grad():
            torch.testing.assert_close(mlp(x, norm=ln), mlp.fc2(act(mlp.fc1(ln(x)))))
    mlp.act = gelu
    handle = mlp.fc1.register_full_backward_hook(lambda *args: None)
    assert not _uses_chunks(mlp, x, ln)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    assert not _uses_chunks(mlp, x, ln)
    handle.remove()
    assert _uses_chunks(mlp, x, ln)  # every hook removed: chunks again

    # pruning: its pre-hook recomputes the weight from weight_orig, which an optimiser updates
    prune.l1_unstructured(mlp.fc1, 'weight', amount=0.5)
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        mlp(x, norm=ln).square().sum().backward()
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(mlp(x, norm=ln), mlp.fc2(mlp.act(mlp.fc1(ln(x)))))
        assert (mlp.fc1.weight == 0).float().mean() == 0.5

    from mmpretrain.models.peft.lora import LoRALinear
    mlp, _ = _mlp(7, norm=False)
    mlp.fc1 = LoRALinear(mlp.fc1, alpha=1, rank=2)
    mlp(x).sum().backward()  # 'LoRALinear' object has no attribute 'out_features' before
    assert mlp.fc1.lora_up.weight.grad is not None

    mlp, _ = _mlp(7, norm=False)
    quantised = torch.ao.quantization.quantize_dynamic(mlp.eval(), {torch.nn.Linear})
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(quantised(x).flatten(), mlp(x).flatten(), 0)
    assert cos > 0.99


@pytest.mark.parametrize('bias1,bias2', [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize('chunk_rows', CHUNKINGS)
def test_chunked_mlp_takes_linears_without_bias(chunk_rows, bias1, bias2):
    """``nn.Linear(bias=False)`` is a plain linear too: same values and gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 16)
    mlp, ln = _mlp(chunk_rows, norm=True)
    mlp.fc1 = torch.nn.Linear(16, 64, bias=bias1)
    mlp.fc2 = torch.nn.Linear(64, 16, bias=bias2)
    assert _uses_chunks(mlp, x, ln)
    for got, want in zip(_grads(mlp, x, plain=False, norm=ln), _grads(mlp, x, plain=True, norm=ln)):
        torch.testing.assert_close(got, want)


def test_hidden_dropout_drops_in_training_only():
    """With drop > 0 a training call runs the plain composition, whose dropouts drop (after the
    GELU and after fc2); an eval call is the chunked path, without them."""
    torch.manual_seed(0)
    mlp, x = Mlp(16, 64, drop=0.5, chunk_rows=7), torch.randn(2, 10, 16)
    with torch.no_grad():
        plain = mlp.fc2(mlp.act(mlp.fc1(x)))
        first, second = mlp(x), mlp(x)
        assert not torch.allclose(first, plain) and not torch.allclose(first, second)
        hidden = []
        handle = mlp.drop1.register_forward_hook(lambda m, args, out: hidden.append(out))
        mlp(x)
        handle.remove()
        assert (hidden[0] == 0).float().mean() > 0.3  # about half of the hidden units dropped
        mlp.eval()
        torch.testing.assert_close(mlp(x), plain)


def test_chunked_mlp_refuses_a_second_derivative():
    """Its backward uses the pre-activations saved in forward, which carry no graph: a second
    derivative (a gradient penalty) would be silently wrong, so it raises."""
    mlp, ln = _mlp(7, norm=True)
    x = torch.randn(2, 10, 16, requires_grad=True)
    g, = torch.autograd.grad(mlp(x, norm=ln).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match='marked with @once_differentiable'):
        g.square().sum().backward()


def test_chunked_mlp_in_bf16_sums_the_norm_gradients_in_fp32():
    """A bf16 model (no autocast): the pre-norm's gradients are summed over 286 chunks of 7
    rows in fp32, as the weights' are; summed in bf16 they were 0.024 off the fp64 reference."""
    torch.manual_seed(0)
    (mlp, ln), x = _mlp(7, True), torch.randn(4, 500, 16)

    def norm_grads(dtype):
        for p in [*mlp.to(dtype).parameters(), *ln.to(dtype).parameters()]:
            p.grad = None
        mlp(x.to(dtype).requires_grad_(True), norm=ln).float().sum().backward()
        return [ln.weight.grad.double(), ln.bias.grad.double()]

    for low, ref in zip(norm_grads(torch.bfloat16), norm_grads(torch.float64)):
        assert ((low - ref).norm() / ref.norm()).item() < 0.01


def test_chunked_mlp_on_no_tokens_gives_empty_outputs_and_gradients():
    mlp, x = Mlp(8, 32), torch.randn(1, 0, 8, requires_grad=True)
    out = mlp(x)
    out.sum().backward()
    assert out.shape == x.grad.shape == (1, 0, 8)


def test_chunked_mlp_computes_only_the_gradients_needed():
    (mlp, ln), x = _mlp(7, True), torch.randn(2, 10, 16, requires_grad=True)
    mlp.requires_grad_(False)  # a frozen stage under a trainable one
    ln.requires_grad_(False)
    mlp(x, norm=ln).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in mlp.parameters())
    x = torch.randn(2, 10, 16)  # input without gradient, trainable weights
    mlp.requires_grad_(True)
    ln.requires_grad_(True)
    mlp(x, norm=ln).sum().backward()
    assert all(p.grad is not None for p in [*mlp.parameters(), *ln.parameters()])
    mlp.zero_grad()  # only the norm trainable: its gradients need the input's path
    mlp.requires_grad_(False)
    ln.weight.grad = None
    mlp(x, norm=ln).sum().backward()
    assert ln.weight.grad is not None and ln.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('norm', NORMS, ids=NORM_IDS)
def test_chunked_mlp_keeps_only_its_input_and_the_pre_activation_for_backward(norm):
    (mlp, ln), x = _mlp(7, norm), torch.randn(2, 10, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mlp(x, norm=ln)
    params = {p.data_ptr() for p in mlp.parameters()}
    params |= set() if ln is None else {p.data_ptr() for p in ln.parameters()}
    acts = [t for t in saved if t.data_ptr() not in params]
    # x (20 x 16) and the three hidden chunks (7 + 7 + 6 rows of 64): never gelu(h), and with
    # the pre-norm never the normalised tokens
    assert sorted(tuple(t.shape) for t in acts) == [(6, 64), (7, 64), (7, 64), (20, 16)]
    if norm:  # what is kept of the input is x itself, not a copy
        assert [t.data_ptr() for t in acts if t.shape == (20, 16)] == [x.data_ptr()]


def test_default_chunks_are_chunk_rows_token_rows_whatever_the_width():
    """By default a CPU MLP runs in chunks of CHUNK_ROWS token rows, batch entries together,
    for a narrow hidden layer as for a wide one; a chunk size below one row is refused."""
    rows = 2 * CHUNK_ROWS + 5
    for hidden in (32, 256):
        mlp, x = Mlp(16, hidden), torch.randn(1, rows, 16, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t):
            mlp(x)
        params = {p.data_ptr() for p in mlp.parameters()}
        assert sorted(t.shape[0] for t in saved if t.data_ptr() not in params
                      and t.shape[-1] == hidden) == [5, CHUNK_ROWS, CHUNK_ROWS]
    with pytest.raises(ValueError, match='chunk_rows'):
        Mlp(16, 64, chunk_rows=0)


@pytest.mark.parametrize('norm', NORMS, ids=NORM_IDS)
@pytest.mark.parametrize('chunk_rows', CHUNKINGS)
def test_chunked_mlp_recomputing_its_hidden_keeps_only_its_input_and_changes_nothing(
        chunk_rows, norm):
    """``recompute_hidden`` (set by the backbones' ``with_cp``) keeps only the input for
    backward and recomputes each chunk's ``h`` there exactly as the forward computed it: the
    same values and gradients, bit for bit, in fp32 and under bf16 autocast, there with fp32
    tokens and with bf16 ones (a block's after a bf16 patch embedding: the forward's norm is
    PyTorch's, as the backward's, not mmtwins' inference kernel)."""
    torch.manual_seed(0)
    (mlp, ln), x = _mlp(chunk_rows, norm), torch.randn(2, 10, 16)
    for autocast, dtype in ((False, torch.float32), (True, torch.float32), (True, torch.bfloat16)):
        mlp.recompute_hidden = False
        kept = _grads(mlp, x.to(dtype), False, autocast, norm=ln)
        mlp.recompute_hidden = True
        for a, b in zip(_grads(mlp, x.to(dtype), False, autocast, norm=ln), kept):
            assert torch.equal(a, b)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mlp(x.requires_grad_(True), norm=ln)
    params = {p.data_ptr() for p in mlp.parameters()}
    params |= set() if ln is None else {p.data_ptr() for p in ln.parameters()}
    assert [tuple(t.shape) for t in saved if t.data_ptr() not in params] == [(20, 16)]


#: Operators that launch no kernel: views, and the dtype promotion rule.
_NO_KERNEL = {'view', 'slice', 't', 'detach', 'reshape', '_unsafe_view', 'promote_types'}


@pytest.mark.parametrize('norm', NORMS, ids=NORM_IDS)
def test_one_chunk_backward_runs_only_the_needed_kernels(norm):
    """On a GPU (one chunk) a training step is launch-bound: each operator's host time counts.
    The backward of one chunk runs autograd's own gradient kernels plus the two recomputations
    (GELU, and the pre-norm if given), with no zero-filled accumulators, copies or additions."""
    (mlp, ln), x = _mlp(None, norm), torch.randn(2, 10, 16, requires_grad=True)
    y = mlp(x, norm=ln)
    grad = torch.randn_like(y)
    with CountOps() as count:
        y.backward(grad)
    kernels = {op: n for op, n in count.ops.items() if op not in _NO_KERNEL}
    expected = {'gelu': 1, 'mm': 4, 'sum': 2, 'gelu_backward': 1}
    if norm:
        expected.update(native_layer_norm=1, native_layer_norm_backward=1)
    assert kernels == expected


@pytest.mark.parametrize('attn', ['gsa', 'lsa'])
def test_packed_projection_gradients_are_stacked_once_in_place(attn):
    """The q/k/v (LSA) and k/v (GSA) gradients are stacked straight into the layout of the
    packed linear's output: one ``stack``, no ``clone`` to make them contiguous again. LSA's
    one clone is the un-windowing of the output's gradient."""
    from mmtwins.models.layers import GlobalSubsampledAttention, LocallyGroupedAttention
    layer = (GlobalSubsampledAttention(32, 2, sr_ratio=2) if attn == 'gsa' else
             LocallyGroupedAttention(32, 2, window_size=7))
    y = layer(torch.randn(2, 196, 32, requires_grad=True), (14, 14))
    with CountOps() as count:
        y.sum().backward()
    assert count.ops['stack'] == 1
    assert count.ops['clone'] == (1 if attn == 'lsa' else 0)


@pytest.mark.parametrize('hw', [(14, 14), (9, 12)], ids=['whole-windows', 'padded'])
def test_lsa_projection_keeps_no_copy_of_the_attention_output(hw):
    from mmtwins.models.layers import LocallyGroupedAttention
    attn = LocallyGroupedAttention(16, num_heads=2, window_size=7)
    x = torch.randn(2, hw[0] * hw[1], 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = attn(x, hw)
    windows = 2 * 2 * 2  # batch 2, 2 x 2 windows of 7 x 7 either way
    # The attention's output (windows, heads, 49, d), token-major (q, k, v have row stride 3C),
    # and the 2-D inputs the qkv and proj linears keep.
    out = [t for t in saved if t.shape == (windows, 2, 49, 8) and t.stride(2) == 16]
    rows = [t for t in saved if t.shape == (windows * 49, 16)]
    assert len(out) == 1 and len(rows) == 2
    ptr = out[0].untyped_storage().data_ptr()
    assert sum(t.untyped_storage().data_ptr() == ptr for t in rows) == 1
    assert y.shape == x.shape


@pytest.mark.parametrize('family', ['svt', 'pcpvt'])
def test_training_keeps_at_most_0_8x_the_activations_of_timm(family):
    """Bytes autograd keeps for backward (a deterministic count, not a timing)."""
    x = torch.randn(1, 3, 128, 128)
    ours = saved_tensor_mb(build_impl('mmtwins', family, 'small'), x)
    timm = saved_tensor_mb(build_impl('timm', family, 'small'), x)
    assert ours <= 0.8 * timm


@pytest.mark.parametrize('against', ['plain', 'HEAD'])
def test_mlp_ab_tool_times_mmtwins_against_the_other_path(against):
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / 'tools/analysis_tools/mlp_ab.py'),
                          '--against', against, '--size', '64', '--steps', '6',
                          '--variants', 'svt'], capture_output=True, text=True, cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    line, = res.stdout.splitlines()
    assert line.startswith('svt-small train 2x3x64x64 fp32 cpu: mmtwins ')
    assert f', {against} ' in line


@pytest.mark.parametrize('cls,arch', [('SVT', TINY_SVT), ('PCPVT', TINY_PCPVT)])
def test_block_gradients_stay_token_major_under_nchw_head_gradients(cls, arch):
    """A neck's gradients arrive in NCHW order, which as tokens is a transposed layout; every
    block's and PEG's output gradient must still be contiguous tokens (else the residual
    gradients are summed into a transposed tensor, many times slower on a CPU)."""
    import mmtwins.models.backbones as backbones
    from mmtwins.models.layers import PositionEncodingGenerator, TwinsBlock
    model = getattr(backbones, cls)(arch=arch)
    layouts = []

    def watch(module, args, out):
        out.register_hook(lambda g: layouts.append((type(module).__name__, g.is_contiguous())))

    for m in model.modules():
        if isinstance(m, (TwinsBlock, PositionEncodingGenerator)):
            m.register_forward_hook(watch)
    outs = model(torch.randn(2, 3, 64, 64))
    projected_loss(outs).backward()
    assert len(layouts) == sum(arch['depths']) + 4
    assert all(contiguous for _, contiguous in layouts), layouts


def test_patch_embedding_takes_its_input_channels_last_on_a_cpu():
    """So the tokens are a view of the conv's output, with unchanged values."""
    import torch.nn.functional as F

    from mmtwins.models.layers import PatchEmbed
    embed = PatchEmbed(3, 16, 4)
    layouts = []
    embed.proj.register_forward_pre_hook(
        lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    img = torch.randn(2, 3, 30, 30)  # padded to 32 x 32
    tokens, hw = embed(img)
    assert layouts == [True] and hw == (8, 8)
    ref = embed.norm(embed.proj(F.pad(img, (0, 2, 0, 2))).flatten(2).transpose(1, 2))
    torch.testing.assert_close(tokens, ref)


def test_patch_embedding_casts_to_the_autocast_dtype_in_its_channels_last_copy():
    """Under CPU autocast the conv gets the input in autocast's dtype, as autocast would cast it,
    with the same values."""
    import torch.nn.functional as F

    from mmtwins.models.layers import PatchEmbed
    embed = PatchEmbed(3, 16, 4).eval()
    seen = []
    embed.proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    img = torch.randn(2, 3, 30, 30)
    with torch.inference_mode(), torch.autocast('cpu', torch.bfloat16):
        tokens, _ = embed(img)
        ref = embed.norm(embed.proj(F.pad(img, (0, 2, 0, 2))).flatten(2).transpose(1, 2))
    assert seen[0] == torch.bfloat16 and tokens.dtype == ref.dtype
    torch.testing.assert_close(tokens, ref, atol=0, rtol=0)
