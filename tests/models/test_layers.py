"""Each layer against the PyTorch op it mirrors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models._utils import _make_divisible

from resmobile_jax.models import layers
from resmobile_jax.models.kernels import cpu_kernels


def torch_conv_with_grads(x, w, g, stride, padding=0, groups=1):
    """torch's conv2d and its autograd gradients, in our layouts: x and g NHWC, w HWIO; returns (y, dx, dw)."""
    x, w, g = (np.array(a) for a in (x, w, g))  # writable copies (callers may pass read-only JAX buffers)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous().requires_grad_(True)
    yt = torch.nn.functional.conv2d(xt, wt, stride=stride, padding=padding, groups=groups)
    yt.backward(torch.from_numpy(g).permute(0, 3, 1, 2))
    return yt.detach().permute(0, 2, 3, 1).numpy(), xt.grad.permute(0, 2, 3, 1).numpy(), wt.grad.permute(2, 3, 1, 0).numpy()


@pytest.mark.parametrize("value", [8, 15, 16, 17, 18, 20, 30, 60, 72 // 4, 120 // 4, 240 // 4, 480 // 4, 672 // 4, 960 // 4, 3.5, 100.0])
def test_make_divisible_matches_torchvision(value):
    assert layers.make_divisible(value, 8) == _make_divisible(value, 8)


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, (9, 7)), (3, 2, (9, 8)), (5, 1, (8, 8)), (5, 2, (11, 6)), (3, 2, (2, 3))])
@pytest.mark.parametrize("impl", ["xla", "shifted", "cpu_kernel"])
def test_depthwise_conv_matches_torch_grouped_conv(kernel, stride, size, impl, rng):
    c = 6
    x = rng.standard_normal((2, c, *size)).astype(np.float32)
    w = rng.standard_normal((c, 1, kernel, kernel)).astype(np.float32)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=kernel // 2, groups=c)
    out = layers.depthwise_conv(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(w.transpose(2, 3, 1, 0)), stride, kernel // 2, impl)
    np.testing.assert_allclose(np.asarray(out), ref.numpy().transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kernel,stride,size,batch,c",
    # 19 channels: two 8-channel SIMD vectors and a scalar tail in the C++ kernels; then two shapes of V1 at 64 px
    [(3, 1, (9, 7), 3, 19), (3, 2, (9, 8), 3, 19), (5, 1, (8, 8), 3, 19), (5, 2, (11, 6), 3, 19), (3, 2, (2, 3), 3, 19),
     (3, 1, (32, 32), 4, 16), (5, 2, (16, 16), 4, 72)],
)
@pytest.mark.parametrize("impl", ["xla", "shifted", "cpu_kernel"])
def test_depthwise_conv_gradients_match_torch_autograd(kernel, stride, size, batch, c, impl, rng):
    """Input and kernel gradients of every implementation (cpu_kernel's are hand-written C++) against torch."""
    import jax

    x = rng.standard_normal((batch, *size, c)).astype(np.float32)
    w = rng.standard_normal((kernel, kernel, 1, c)).astype(np.float32)
    y, pullback = jax.vjp(lambda x, w: layers.depthwise_conv(x, w, stride, kernel // 2, impl), jnp.asarray(x), jnp.asarray(w))
    g = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw = jax.jit(pullback)(jnp.asarray(g))
    ref_y, ref_dx, _ = torch_conv_with_grads(x, w, g, stride, kernel // 2, groups=c)
    np.testing.assert_allclose(np.asarray(y), ref_y, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(dx), ref_dx, atol=1e-5, rtol=0)
    # dw sums batch*H*W products per tap: held to float64 within 4e-7 of the sum of the products' magnitudes (every
    # implementation measures <= 1.6e-7, torch float32 itself up to 1.5e-7), which scales with the sum's length.
    as64 = [a.astype(np.float64) for a in (x, w, g)]
    _, _, exact_dw = torch_conv_with_grads(*as64, stride, kernel // 2, groups=c)
    _, _, magnitude = torch_conv_with_grads(*[np.abs(a) for a in as64], stride, kernel // 2, groups=c)
    assert np.all(np.abs(np.asarray(dw) - exact_dw) <= 4e-7 * magnitude), np.max(np.abs(np.asarray(dw) - exact_dw) - 4e-7 * magnitude)


def test_auto_depthwise_impl_on_this_cpu():
    """The test machine is a 1-device CPU with a C++ compiler: float32 gets the hand-written kernel, other dtypes
    the shifted form; unknown names and cpu_kernel in bfloat16 are refused by name."""
    assert layers.default_depthwise_impl(jnp.float32) == "cpu_kernel"
    assert layers.default_depthwise_impl(jnp.bfloat16) == "shifted"
    x = jnp.ones((1, 8, 8, 4), jnp.bfloat16)
    assert layers.DepthwiseConv(4, 3, rng=np.random.default_rng(0), dtype=jnp.bfloat16)(x).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="depthwise_impl"):
        layers.DepthwiseConv(4, 3, impl="fast", rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="cpu_kernel.*float32.*bfloat16"):
        layers.DepthwiseConv(4, 3, impl="cpu_kernel", rng=np.random.default_rng(0))(x)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("impl", ["matmul", "conv"])
def test_pointwise_conv_and_gradients_match_torch(stride, impl, rng):
    import jax

    conv = layers.Conv(12, 20, 1, stride=stride, pointwise_impl=impl, rng=np.random.default_rng(0))
    assert conv.pointwise_matmul == (impl == "matmul")
    x = rng.standard_normal((2, 9, 6, 12)).astype(np.float32)
    w = np.asarray(conv.kernel[...])

    def f(x, w):
        return layers.pointwise_matmul(x, w, stride) if impl == "matmul" else layers._conv(x, w, stride, 0)

    np.testing.assert_array_equal(np.asarray(conv(jnp.asarray(x))), np.asarray(f(jnp.asarray(x), jnp.asarray(w))))
    y, pullback = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
    g = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw = pullback(jnp.asarray(g))
    ref_y, ref_dx, ref_dw = torch_conv_with_grads(x, w, g, stride)
    np.testing.assert_allclose(np.asarray(y), ref_y, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), ref_dx, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), ref_dw, atol=1e-4)
    with pytest.raises(ValueError, match="pointwise_impl"):
        layers.Conv(4, 4, 1, pointwise_impl="gemm", rng=np.random.default_rng(0))


@pytest.mark.parametrize("impl", ["xla", "cpu_kernel"])
def test_max_pool_pads_with_minus_infinity(impl, rng):
    x = -np.abs(rng.standard_normal((2, 11, 7, 6))).astype(np.float32) - 1.0  # all negative: zero padding would win
    ref = torch.nn.MaxPool2d(3, 2, 1)(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    out = np.asarray(layers.max_pool_3x3_s2(jnp.asarray(x.transpose(0, 2, 3, 1)), impl))
    np.testing.assert_array_equal(out, ref)
    assert out.max() < 0


@pytest.mark.parametrize("impl", ["xla", "cpu_kernel"])
@pytest.mark.parametrize("hw", [(16, 16), (17, 17), (30, 13)])
def test_max_pool_gradient_matches_torch_including_ties(hw, impl, rng):
    """The hand-written backward routes each output's gradient to its window's first maximum, as PyTorch does: the
    1.5s at odd columns of even rows tie in every window but those at the left edge (columns 2q-1 and 2q+1 of its
    middle row), and each window has only values <= 1 elsewhere."""
    import jax

    x = np.clip(rng.standard_normal((2, *hw, 13)).astype(np.float32), 0, 1)  # 13 channels: vectors and a tail
    x[:, ::2, 1::2] = 1.5
    g = rng.standard_normal((2, (hw[0] - 1) // 2 + 1, (hw[1] - 1) // 2 + 1, 13)).astype(np.float32)
    y, pullback = jax.vjp(lambda x: layers.max_pool_3x3_s2(x, impl), jnp.asarray(x))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    yt = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
    yt.backward(torch.from_numpy(g).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(np.asarray(y), yt.detach().permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(np.asarray(pullback(jnp.asarray(g))[0]), xt.grad.permute(0, 2, 3, 1).numpy(), atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "cpu_kernel"])
def test_max_pool_gradient_of_minus_infinity_windows_matches_torch(impl, rng):
    """A window whose values are all -inf (at the border too) sends its gradient to its first tap inside x, as
    PyTorch's kernel does, never to the padding."""
    import jax

    x = np.full((2, 9, 10, 19), -np.inf, np.float32)
    x[:, 5:, 6:] = rng.standard_normal((2, 4, 4, 19)).astype(np.float32)
    g = rng.standard_normal((2, 5, 5, 19)).astype(np.float32)
    y, pullback = jax.vjp(lambda x: layers.max_pool_3x3_s2(x, impl), jnp.asarray(x))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    torch.nn.functional.max_pool2d(xt, 3, 2, 1).backward(torch.from_numpy(g).permute(0, 3, 1, 2))
    dx = np.asarray(pullback(jnp.asarray(g))[0])
    np.testing.assert_allclose(dx, xt.grad.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert np.count_nonzero(dx[:, 0, 0]) == 2 * 19  # the corner window's gradient reached x[0, 0]


@pytest.mark.parametrize("kernel,stride,size,out_channels",
                         [(3, 2, 17, 16), (7, 2, 19, 64), (3, 1, 9, 5), (5, 2, 10, 32), (3, 1, 11, 8)])
def test_stem_conv_cpu_kernel_and_gradients_match_torch(kernel, stride, size, out_channels, rng):
    """The hand-written few-input-channel conv (register-vector paths for 8/16/32/64 outputs, a plain loop
    otherwise; kernel-gradient tap blocks of 12/V, 6/V and single taps): output, input and kernel gradients against
    torch; the stems pick it on this CPU."""
    import jax

    conv = layers.Conv(3, out_channels, kernel, stride=stride, rng=np.random.default_rng(0))
    assert conv.stem_conv_impl == "auto" and layers.cpu_kernels_apply(jnp.float32)
    x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    w = np.asarray(conv.kernel[...])
    y, pullback = jax.vjp(lambda x, w: cpu_kernels.dense_conv(x, w, stride, kernel // 2), jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(conv(jnp.asarray(x))), np.asarray(y))
    g = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw = jax.jit(pullback)(jnp.asarray(g))
    ref_y, ref_dx, ref_dw = torch_conv_with_grads(x, w, g, stride, kernel // 2)
    np.testing.assert_allclose(np.asarray(y), ref_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="stem_conv_impl"):
        layers.Conv(3, 8, 3, stem_conv_impl="onednn", rng=np.random.default_rng(0))


@pytest.mark.parametrize("kernel,stride,size", [(7, 2, 32), (7, 2, 33), (5, 1, 12)])
def test_stem_conv_gradients_match_torch(kernel, stride, size, rng):
    """Without the CPU kernel, convs with few input channels and large kernels take the patch-matmul kernel gradient;
    both gradients must still be PyTorch's."""
    import jax

    conv = layers.Conv(3, 8, kernel, stride=stride, stem_conv_impl="xla", rng=np.random.default_rng(0))
    assert conv.im2col_weight_grad
    x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    w = np.asarray(conv.kernel[...])
    y, pullback = jax.vjp(lambda x, w: layers.conv_im2col_weight_grad(x, w, stride, kernel // 2), jnp.asarray(x), jnp.asarray(w))
    g = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw = pullback(jnp.asarray(g))
    ref_y, ref_dx, ref_dw = torch_conv_with_grads(x, w, g, stride, kernel // 2)
    np.testing.assert_allclose(np.asarray(y), ref_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=1e-4, atol=1e-4)


TORCH_ACTIVATIONS = {"relu": torch.nn.ReLU, "hardswish": torch.nn.Hardswish, "identity": torch.nn.Identity}


@pytest.mark.parametrize(
    "in_c,out_c,kernel,stride,size,activation,max_pool",
    # depthwise (19 channels: SIMD vectors and a scalar tail), then the two stems' dense convs, wider dense convs like
    # the tail's 3x3 (8-channel blocks; 20 outputs: the plain loop), then the stems followed by ResNet's max pool
    # (V2's stem; odd and even map sizes, and 12 channels: a scalar tail), then 1x1 convs over at most
    # POINTWISE_KERNEL_MAX_PIXELS pixels (2 images: 2x5x5 = 50 pixels, panels of 32, 16, 8 channels and a scalar
    # tail of 4; 160 -> 960 as in the 7x7 stage; 6 channels: one panel, fewer than threads, so split by pixels)
    [(19, 19, 3, 1, 9, "relu", False), (19, 19, 5, 2, 11, "hardswish", False), (19, 19, 3, 2, 8, "identity", False),
     (3, 16, 3, 2, 17, "hardswish", False), (3, 64, 7, 2, 19, "relu", False),
     (40, 24, 3, 1, 7, "relu", False), (36, 20, 3, 1, 2, "relu", False),
     (3, 64, 7, 2, 20, "relu", True), (3, 12, 3, 2, 17, "identity", True),
     (44, 60, 1, 1, 5, "hardswish", False), (160, 960, 1, 1, 4, "hardswish", False), (960, 160, 1, 1, 3, "identity", False),
     (24, 12, 1, 1, 1, "relu", False), (20, 6, 1, 1, 5, "relu", False)],
)
def test_eval_conv_bn_act_runs_as_one_kernel_and_matches_torch(in_c, out_c, kernel, stride, size, activation, max_pool,
                                                                rng):
    """Eval mode with the C++ kernels: conv, BatchNorm (running statistics), activation (and max pool) in one kernel
    call (1x1 convs over few pixels too); output and every gradient (frozen-BN fine-tuning differentiates it) against torch's Conv2d ->
    BatchNorm2d -> act (-> MaxPool2d(3, 2, 1))."""
    import jax
    from flax import nnx

    depthwise = in_c == out_c and kernel > 1
    block = layers.ConvBNAct(in_c, out_c, kernel, stride=stride, depthwise=depthwise, activation=activation,
                             bn=layers.MOBILENET_BN, rng=np.random.default_rng(0))
    tconv = torch.nn.Conv2d(in_c, out_c, kernel, stride, kernel // 2, groups=in_c if depthwise else 1, bias=False)
    tbn = torch.nn.BatchNorm2d(out_c, eps=layers.MOBILENET_BN["epsilon"])
    with torch.no_grad():
        tconv.weight.copy_(torch.from_numpy(np.asarray(block.conv.kernel[...]).transpose(3, 2, 0, 1).copy()))
        for name, param in [("weight", block.bn.scale), ("bias", block.bn.bias)]:
            getattr(tbn, name).copy_(torch.from_numpy(rng.standard_normal(out_c).astype(np.float32)))
            param[...] = jnp.asarray(getattr(tbn, name).detach().numpy())
        tbn.running_mean.copy_(torch.from_numpy(rng.standard_normal(out_c).astype(np.float32)))
        tbn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, out_c).astype(np.float32)))
    block.bn.mean[...] = jnp.asarray(tbn.running_mean.numpy())
    block.bn.var[...] = jnp.asarray(tbn.running_var.numpy())
    block.eval()
    tbn.eval()
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)

    def forward(params, x):
        return nnx.merge(graphdef, params, rest)(x, max_pool=max_pool)

    x = rng.standard_normal((2, size, size, in_c)).astype(np.float32)
    target = "@resmobile_depthwise_forward_bn_act(" if depthwise else "@resmobile_dense_conv_forward_bn_act("
    target = "@resmobile_dense_conv_forward_bn_act_max_pool(" if max_pool else target
    target = "@resmobile_pointwise_forward_bn_act(" if kernel == 1 else target
    lowered = jax.jit(forward).lower(params, jnp.asarray(x)).as_text()
    plain = "@resmobile_depthwise_forward(" if depthwise else "@resmobile_dense_conv_forward("
    assert target in lowered and plain not in lowered  # one call, the fused one

    y, pullback = jax.vjp(forward, params, jnp.asarray(x))
    g = rng.standard_normal(y.shape).astype(np.float32)
    dparams, dx = jax.jit(pullback)(jnp.asarray(g))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    yt = TORCH_ACTIVATIONS[activation]()(tbn(tconv(xt)))
    yt = torch.nn.MaxPool2d(3, 2, 1)(yt) if max_pool else yt
    yt.backward(torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(dx), xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dparams["conv"]["kernel"][...]),
                               tconv.weight.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(dparams["bn"]["scale"][...]), tbn.weight.grad.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(dparams["bn"]["bias"][...]), tbn.bias.grad.numpy(), rtol=1e-4, atol=1e-3)

    block.fuse_eval_bn = False  # the unfused path computes the same function
    unfused_graphdef = nnx.split(block, nnx.Param, ...)[0]
    unfused = jax.jit(lambda p, x: nnx.merge(unfused_graphdef, p, rest)(x, max_pool=max_pool)).lower(params, jnp.asarray(x))
    # the unfused path: the plain C++ conv, except for wide dense convs, which train with XLA's
    assert target not in unfused.as_text() and (plain in unfused.as_text()) == (depthwise or in_c <= 4)
    np.testing.assert_allclose(np.asarray(unfused.compile()(params, jnp.asarray(x))), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_activations_match_torch(rng):
    x = np.linspace(-5, 5, 1001).astype(np.float32)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(np.asarray(layers.hard_swish(jnp.asarray(x))), torch.nn.Hardswish()(t).numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(layers.hard_sigmoid(jnp.asarray(x))), torch.nn.Hardsigmoid()(t).numpy(), atol=1e-6)


@pytest.mark.parametrize("name", ["hard_swish", "hard_sigmoid"])
def test_activation_gradients_match_torch_at_the_kinks(name):
    """The hand-written derivatives, including exactly at -3 and 3 where autodiff of the clip would differ."""
    x = np.concatenate([np.linspace(-5, 5, 1001), [-3.0, 3.0, -3.0 - 1e-6, 3.0 + 1e-6, 0.0]]).astype(np.float32)
    g = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    fn = getattr(layers, name)
    dx = jax.grad(lambda v: jnp.vdot(fn(v), jnp.asarray(g)))(jnp.asarray(x))
    t = torch.from_numpy(x).requires_grad_(True)
    (torch.nn.Hardswish() if name == "hard_swish" else torch.nn.Hardsigmoid())(t).backward(torch.from_numpy(g))
    np.testing.assert_allclose(np.asarray(dx), t.grad.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "cpu_kernel"])
@pytest.mark.parametrize("shape", [(4, 5, 3, 8), (6, 8)])
@pytest.mark.parametrize("eps,torch_momentum", [(1e-3, 0.01), (1e-5, 0.1)])
def test_batchnorm_train_and_eval_match_torch(shape, eps, torch_momentum, impl, rng):
    c = shape[-1]
    tbn = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(c, eps=eps, momentum=torch_momentum)
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(rng.standard_normal(c).astype(np.float32)))
        tbn.bias.copy_(torch.from_numpy(rng.standard_normal(c).astype(np.float32)))
        tbn.running_mean.copy_(torch.from_numpy(rng.standard_normal(c).astype(np.float32)))
        tbn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, c).astype(np.float32)))
    bn = layers.BatchNorm(c, epsilon=eps, momentum=1.0 - torch_momentum, impl=impl)
    bn.scale[...] = jnp.asarray(tbn.weight.detach().numpy())
    bn.bias[...] = jnp.asarray(tbn.bias.detach().numpy())
    bn.mean[...] = jnp.asarray(tbn.running_mean.numpy())
    bn.var[...] = jnp.asarray(tbn.running_var.numpy())

    def nhwc(a):
        return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a

    for step in range(3):  # train mode: batch statistics, running stats updated with the unbiased variance
        x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
        x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy() if x.ndim == 4 else x)
        tbn.train()
        with torch.no_grad():
            ref = nhwc(tbn(x_torch).numpy())
        bn.use_running_average = False
        out = np.asarray(bn(jnp.asarray(x)))
        np.testing.assert_allclose(out, ref, atol=2e-5)
        np.testing.assert_allclose(np.asarray(bn.mean[...]), tbn.running_mean.numpy(), atol=1e-6)
        np.testing.assert_allclose(np.asarray(bn.var[...]), tbn.running_var.numpy(), rtol=1e-6)
        assert int(bn.num_batches_tracked[...]) == int(tbn.num_batches_tracked) == step + 1
    tbn.eval()
    bn.use_running_average = True
    with torch.no_grad():
        ref = nhwc(tbn(x_torch).numpy())
    np.testing.assert_allclose(np.asarray(bn(jnp.asarray(x))), ref, atol=2e-5)
    assert int(bn.num_batches_tracked[...]) == 3  # eval does not count


TORCH_ACT_FUNCTIONS = {"relu": torch.relu, "hardswish": torch.nn.functional.hardswish, "identity": lambda t: t}


@pytest.mark.parametrize("impl", ["xla", "cpu_kernel"])
@pytest.mark.parametrize("activation", ["relu", "hardswish", "identity"])
def test_batchnorm_activation_training_gradients_match_torch(impl, activation, rng):
    """act(BN(x)) with batch statistics: output, running statistics and the gradients of x, scale and bias against
    torch's BatchNorm2d + activation. 20 channels: the kernel's 8-wide vectors and its scalar tail."""
    from flax import nnx

    n, h, w, c = 4, 7, 9, 20
    x = (3.0 + 2.0 * rng.standard_normal((n, h, w, c))).astype(np.float32)
    g = rng.standard_normal((n, h, w, c)).astype(np.float32)
    gamma, beta = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    tbn = torch.nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(gamma))
        tbn.bias.copy_(torch.from_numpy(beta))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    yt = TORCH_ACT_FUNCTIONS[activation](tbn(xt))
    yt.backward(torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))

    bn = layers.BatchNorm(c, **layers.MOBILENET_BN, impl=impl)
    bn.scale[...], bn.bias[...] = jnp.asarray(gamma), jnp.asarray(beta)
    graphdef, params, rest = nnx.split(bn, nnx.Param, ...)

    def loss(p, x, r):
        m = nnx.merge(graphdef, p, r, copy=True)
        y = m(x, activation)
        return jnp.vdot(y, jnp.asarray(g)), (y, nnx.state(m, nnx.BatchStat))

    step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    hlo = step.lower(params, jnp.asarray(x), rest).as_text()
    assert ("resmobile_batch_norm_act_backward" in hlo) == (impl == "cpu_kernel")
    (dparams, dx), (y, stats) = step(params, jnp.asarray(x), rest)
    np.testing.assert_allclose(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(stats["mean"][...]), tbn.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["var"][...]), tbn.running_var.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dx), xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dparams["scale"][...]), tbn.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dparams["bias"][...]), tbn.bias.grad.numpy(), rtol=1e-4, atol=1e-4)


# Batch 2: few output rows, the kernel computes all input rows first; batch 12: rows computed into a ring as it goes
@pytest.mark.parametrize("batch", [2, 12])
@pytest.mark.parametrize("kernel,stride,activation", [(3, 1, "relu"), (3, 2, "hardswish"), (5, 2, "relu"),
                                                       (5, 1, "hardswish")])
def test_batchnorm_into_depthwise_matches_torch(batch, kernel, stride, activation, rng):
    """cpu_kernels.batch_norm_act_depthwise (training: the depthwise kernels apply the BN + activation to the rows
    they read) against torch's BatchNorm2d + activation + grouped Conv2d: output, batch statistics, and the
    gradients of x, scale, bias and the depthwise kernel. 20 channels: 8-wide vectors and a scalar tail."""
    h, w, c, p = 9, 10, 20, kernel // 2
    x = (3.0 + 2.0 * rng.standard_normal((batch, h, w, c))).astype(np.float32)
    gamma, beta = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    wk = (0.3 * rng.standard_normal((kernel, kernel, 1, c))).astype(np.float32)
    tbn = torch.nn.BatchNorm2d(c, eps=1e-3, momentum=1.0)  # momentum 1: running stats = this batch's (unbiased var)
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(gamma))
        tbn.bias.copy_(torch.from_numpy(beta))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    wt = torch.from_numpy(wk.transpose(3, 2, 0, 1).copy()).requires_grad_(True)
    yt = torch.nn.functional.conv2d(TORCH_ACT_FUNCTIONS[activation](tbn(xt)), wt, stride=stride, padding=p, groups=c)
    g = rng.standard_normal(yt.shape).astype(np.float32).transpose(0, 2, 3, 1)
    yt.backward(torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))

    def loss(x, gamma, beta, wk):
        y, mean, var = cpu_kernels.batch_norm_act_depthwise(x, gamma, beta, 1e-3, activation, wk, stride, p)
        return jnp.vdot(y, jnp.asarray(g)), (y, mean, var)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    args = tuple(jnp.asarray(a) for a in (x, gamma, beta, wk))
    hlo = step.lower(*args).as_text()
    assert "resmobile_bn_act_depthwise_forward" in hlo and "resmobile_bn_act_depthwise_kernel_grad" in hlo
    (dx, dgamma, dbeta, dw), (y, mean, var) = step(*args)
    n = batch * h * w
    np.testing.assert_allclose(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(mean), tbn.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(var) * n / (n - 1), tbn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dx), xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dgamma), tbn.weight.grad.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(dbeta), tbn.bias.grad.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(dw), wt.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-3)


def test_batchnorm_kernel_statistics_hold_for_a_large_mean(rng):
    """Single-pass statistics lose the variance to cancellation when the mean is large against the spread
    (E[x^2] - E[x]^2); the kernel's per-row two-pass moments merged in float64 must not. Reference: float64 NumPy."""
    x = (1e4 + rng.standard_normal((4, 16, 24, 12))).astype(np.float32)
    gamma, beta = jnp.ones(12), jnp.zeros(12)
    _, mean, var = cpu_kernels.batch_norm_act(jnp.asarray(x), gamma, beta, 1e-5, "identity")
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(np.asarray(mean), x64.mean(axis=(0, 1, 2)), rtol=1e-7)
    np.testing.assert_allclose(np.asarray(var), x64.var(axis=(0, 1, 2)), rtol=1e-5)


@pytest.mark.slow
def test_batchnorm_kernels_on_a_map_larger_than_the_caches_match_torch(rng):
    """A 67 MB map (16.8M floats, 32 channels, 64-byte aligned by XLA): on AVX-512 CPUs the BN kernels write its
    output and input gradient with non-temporal stores (cpu_kernels.cc's Streamable), every value of which must
    still arrive: output, statistics and gradients against torch's BatchNorm2d. (No activation: at this size some
    outputs fall within rounding of ReLU's kink, where the two frameworks' gradients may differ by a whole g.)"""
    n, h, w, c = 16, 128, 256, 32
    assert n * h * w * c >= 16 << 20  # cpu_kernels.cc's kStreamingMinFloats
    x = (1.0 + rng.standard_normal((n, h, w, c))).astype(np.float32)
    gamma, beta = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    g = rng.standard_normal((n, h, w, c)).astype(np.float32)
    tbn = torch.nn.BatchNorm2d(c, eps=1e-3)
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(gamma))
        tbn.bias.copy_(torch.from_numpy(beta))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)  # NHWC memory, as channels_last
    yt = tbn(xt)
    yt.backward(torch.from_numpy(g).permute(0, 3, 1, 2))

    def loss(x, gamma, beta):
        y, mean, var = cpu_kernels.batch_norm_act(x, gamma, beta, 1e-3, "identity")
        return jnp.vdot(y, jnp.asarray(g)), (y, mean, var)

    (dx, dgamma, dbeta), (y, mean, var) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(
        jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta))
    np.testing.assert_allclose(np.asarray(y), yt.detach().permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)
    x64 = x.astype(np.float64)  # (torch's float32 variance over 524k values is ~6e-5 off)
    np.testing.assert_allclose(np.asarray(mean), x64.mean(axis=(0, 1, 2)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(var), x64.var(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dx), xt.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dgamma), tbn.weight.grad.numpy(), rtol=1e-3, atol=0.5)
    np.testing.assert_allclose(np.asarray(dbeta), tbn.bias.grad.numpy(), rtol=1e-3, atol=0.5)


def test_conv_init_is_torchvision_fan_out_normal():
    w = np.asarray(layers.conv_init(np.random.default_rng(0), (3, 3, 64, 128), jnp.float32))
    ref = torch.empty(128, 64, 3, 3)
    torch.nn.init.kaiming_normal_(ref, mode="fan_out", nonlinearity="relu")
    expected_std = np.sqrt(2.0 / (3 * 3 * 128))
    assert abs(w.std() / expected_std - 1) < 0.02
    assert abs(ref.std().item() / expected_std - 1) < 0.02
    assert np.abs(w).max() > 3 * expected_std  # plain normal, not truncated at 2 std


def test_pointwise_kernel_only_over_few_pixels_in_eval_mode(rng):
    """The 1x1 conv + BN + activation call takes maps of at most `pointwise_kernel_max_pixels` pixels, in eval mode
    only (training's BN needs batch statistics); bigger maps and 0 keep XLA's matmul."""
    import jax
    from flax import nnx

    def lowered(block, pixels):
        graphdef, state = nnx.split(block)
        x = jnp.zeros((1, 1, pixels, 24), jnp.float32)
        return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).as_text()

    block = layers.ConvBNAct(24, 40, 1, activation="relu", rng=np.random.default_rng(0))
    block.eval()
    limit = layers.POINTWISE_KERNEL_MAX_PIXELS
    assert "@resmobile_pointwise_forward_bn_act(" in lowered(block, limit)
    assert "pointwise_forward" not in lowered(block, limit + 1)
    block.pointwise_kernel_max_pixels = 0  # config.model.pointwise_kernel_max_pixels=0
    assert "pointwise_forward" not in lowered(block, 1)
    block.pointwise_kernel_max_pixels = limit
    block.fuse_eval_bn = False
    assert "pointwise_forward" not in lowered(block, 1)
    block.fuse_eval_bn = True
    block.train()
    assert "pointwise_forward" not in lowered(block, 1)


def test_pointwise_kernel_rejects_a_kernel_that_does_not_fit_the_input():
    from resmobile_jax.models.kernels import cpu_kernels

    x, w = jnp.zeros((1, 7, 7, 24), jnp.float32), jnp.zeros((20, 8), jnp.float32)
    with pytest.raises(Exception, match=r"1x1 conv: the kernel must be \(Cin, Cout\)"):
        jax.block_until_ready(cpu_kernels.pointwise_forward_bn_act(x, w, jnp.ones(8), jnp.zeros(8), "relu"))
