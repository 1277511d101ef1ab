"""The blocks' eval-mode kernel fusion, computing what the unfused layers compute (themselves tested against torch in
test_layers.py; the whole network in eval mode against torchvision in tests/convert/test_parity.py): an inverted
residual without squeeze-excitation is one C++ kernel call (expansion, depthwise, projection, their BNs and
activations, the residual); one with SE two (expansion + depthwise + the pool's sums; the projection with the SE
scale folded into its weights, BN and residual) around the SE's matmuls. In training, the expansion's BN +
activation run inside the depthwise kernels (fuse_train_bn), again computing what the unfused layers compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resmobile_jax.models.architecture import MOBILENET_V3_LARGE_BLOCKS, InvertedResidualSpec, mid_block_specs
from resmobile_jax.models import blocks
from resmobile_jax.models.blocks import InvertedResidual


def random_bn_statistics(block, rng):
    for layer in (block.expand, block.depthwise, block.project):
        if layer is None:
            continue
        c = layer.bn.scale[...].shape[0]
        layer.bn.scale[...] = jnp.asarray(rng.standard_normal(c), jnp.float32)
        layer.bn.bias[...] = jnp.asarray(rng.standard_normal(c), jnp.float32)
        layer.bn.mean[...] = jnp.asarray(rng.standard_normal(c), jnp.float32)
        layer.bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)


# Channel counts that are not multiples of 8 or 16 (the kernels' vector blocks): 44 = 32 + 8 + 4, 12 = 8 + 4
ODD_WIDTHS = InvertedResidualSpec(in_channels=12, kernel=3, expanded=44, out_channels=12, use_se=False,
                                  activation="HS", stride=1)
ODD_WIDTHS_SE = ODD_WIDTHS._replace(use_se=True, out_channels=20)
BLOCKS = {
    "no expansion, residual": MOBILENET_V3_LARGE_BLOCKS[0],
    "relu k3 s2": MOBILENET_V3_LARGE_BLOCKS[1],
    "relu k3 residual": MOBILENET_V3_LARGE_BLOCKS[2],
    "se k5 s2": MOBILENET_V3_LARGE_BLOCKS[3],
    "hardswish k3 s2": MOBILENET_V3_LARGE_BLOCKS[6],
    "se hardswish residual": MOBILENET_V3_LARGE_BLOCKS[11],
    "se k5 residual 7x7-like": MOBILENET_V3_LARGE_BLOCKS[13],
    "v2 first block (64 -> 16 expansion)": mid_block_specs("v2")[0],
    "odd widths": ODD_WIDTHS,
    "odd widths, se": ODD_WIDTHS_SE,
}


# Batch 1: few rows, the kernel expands all input rows first; batch 16: it expands rows into a ring as it goes
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_eval_inverted_residual_fuses_into_one_kernel_call(name, batch, rng, monkeypatch):
    monkeypatch.setattr(blocks, "FUSED_BLOCK_MIN_BYTES", 0)  # these maps are small
    spec = BLOCKS[name]
    block = InvertedResidual(spec, rng=np.random.default_rng(0))
    random_bn_statistics(block, rng)
    block.eval()
    x = jnp.asarray(rng.standard_normal((batch, 13, 11, spec.in_channels)), jnp.float32)  # 11 px: partial blocks

    def compiled(block):
        graphdef, params, rest = nnx.split(block, nnx.Param, ...)

        def forward(params, x):
            return nnx.merge(graphdef, params, rest)(x)

        return forward, params, jax.jit(forward).lower(params, x).as_text()

    fused, params, fused_text = compiled(block)
    if spec.use_se:  # the SE pool needs the whole depthwise output before the projection: two calls
        assert fused_text.count("@resmobile_expand_depthwise_forward(") == 1
        assert fused_text.count("@resmobile_se_project_forward(") == 1 and "inverted_residual" not in fused_text
    else:
        assert fused_text.count("@resmobile_inverted_residual_forward(") == 1 and "dot_general" not in fused_text
    assert "@resmobile_depthwise_forward(" not in fused_text and "_bn_act" not in fused_text
    for layer in (block.expand, block.depthwise, block.project):  # the projection: no 1x1 kernel on few pixels
        if layer is not None:
            layer.fuse_eval_bn = False
    unfused, _, unfused_text = compiled(block)
    assert "@resmobile_depthwise_forward(" in unfused_text and "_bn_act" not in unfused_text
    assert "inverted_residual" not in unfused_text

    np.testing.assert_allclose(np.asarray(fused(params, x)), np.asarray(unfused(params, x)), rtol=1e-5, atol=2e-5)

    def gradients(forward):  # frozen-BN fine-tuning differentiates the fused call
        return jax.grad(lambda p, x: jnp.sum(forward(p, x) ** 2), argnums=(0, 1))(params, x)

    for got, want in zip(jax.tree.leaves(gradients(fused)), jax.tree.leaves(gradients(unfused))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def lowered_block(spec, shape, **options) -> str:
    """The eval-mode block's program text for an input of `shape` (N, H, W)."""
    block = InvertedResidual(spec, rng=np.random.default_rng(0), **options)
    block.eval()
    graphdef, state = nnx.split(block)
    x = jax.ShapeDtypeStruct((*shape, spec.in_channels), jnp.float32)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).as_text()


FUSED_BLOCK_CALLS = ("@resmobile_inverted_residual_forward(", "@resmobile_se_project_forward(")  # no SE / with SE


def fused_block_calls(text: str) -> int:
    return sum(text.count(call) for call in FUSED_BLOCK_CALLS)


def runs_fused(text: str) -> bool:
    return fused_block_calls(text) > 0


def test_which_blocks_run_as_kernel_calls():
    """Big expanded maps (FUSED_BLOCK_MIN_BYTES) always run as the fused calls. Below that, with fuse_small_blocks,
    narrow blocks from FUSED_SMALL_BLOCK_MIN_BATCH images and FUSED_SMALL_BLOCK_MIN_PIXELS pixels an image on; wide
    blocks, smaller maps and fewer images keep XLA's matmuls and the depthwise kernel with its BN epilogue."""
    narrow, wide = MOBILENET_V3_LARGE_BLOCKS[2], MOBILENET_V3_LARGE_BLOCKS[11]  # 24 -> 72 (14 KB), 112 -> 672 (SE)
    batch = blocks.FUSED_SMALL_BLOCK_MIN_BATCH
    assert blocks.FUSED_SMALL_BLOCK_MIN_PIXELS == 64  # the 8x8 and 7x8 maps below
    assert 4 * narrow.expanded * (narrow.in_channels + narrow.out_channels) <= blocks.FUSED_BLOCK_MAX_WEIGHT_BYTES
    assert 4 * wide.expanded * (wide.in_channels + wide.out_channels) > blocks.FUSED_BLOCK_MAX_WEIGHT_BYTES
    assert runs_fused(lowered_block(narrow, (batch, 8, 8)))
    few = lowered_block(narrow, (batch - 1, 8, 8))
    assert not runs_fused(few) and "@resmobile_depthwise_forward_bn_act(" in few
    assert not runs_fused(lowered_block(narrow, (batch, 7, 8)))
    assert not runs_fused(lowered_block(narrow, (batch, 8, 8), fuse_small_blocks=False))
    assert not runs_fused(lowered_block(wide, (batch, 8, 8)))
    images = -(-blocks.FUSED_BLOCK_MIN_BYTES // (4 * 16 * wide.expanded))  # 4x4 maps, just over the byte limit
    assert runs_fused(lowered_block(wide, (images, 4, 4), fuse_small_blocks=False))
    assert not runs_fused(lowered_block(wide, (images - 1, 4, 4)))
    side = int(np.ceil(np.sqrt(blocks.FUSED_BLOCK_MIN_BYTES / (4 * narrow.expanded))))  # one image
    assert runs_fused(lowered_block(narrow, (1, side, side)))
    assert not runs_fused(lowered_block(narrow, (1, side - 1, side - 1)))


def test_small_block_fusion_setting_reaches_the_model():
    """config.model.fuse_eval_small_blocks (what `bench.ab --option fuse_eval_small_blocks` compares): V1 at 64 px,
    batch 8, fuses its narrow blocks on 8x8 and larger maps with it (none of its maps reaches FUSED_BLOCK_MIN_BYTES);
    the 4x4 and 2x2 maps stay XLA's either way."""
    from configs.base import get_base_config
    from resmobile_jax.models import build_model

    def fused_calls(**options):
        config = get_base_config("v1", "cpu").model
        config.update(options)
        model = build_model(config)
        graphdef, state = nnx.split(model)
        x = jax.ShapeDtypeStruct((blocks.FUSED_SMALL_BLOCK_MIN_BATCH, 64, 64, 3), jnp.float32)
        return fused_block_calls(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).as_text())

    narrow = sum(4 * s.expanded * ((s.in_channels if s.expanded != s.in_channels else 0) + s.out_channels)
                 <= blocks.FUSED_BLOCK_MAX_WEIGHT_BYTES for s in MOBILENET_V3_LARGE_BLOCKS)
    assert narrow == 10  # every block up to the 240-wide one
    assert fused_calls(fuse_eval_small_blocks=True) == 7  # on 32x32, 16x16 and 8x8 maps; blocks 7-9 see 4x4
    assert fused_calls(fuse_eval_small_blocks=False) == 0


@pytest.mark.parametrize("name", ["relu k3 s2", "se k5 s2", "se hardswish residual", "odd widths"])
def test_training_block_runs_the_expansion_bn_inside_the_depthwise_kernels(name, rng):
    """Training mode, `fuse_train_bn`: the expansion's BN + activation run inside the depthwise kernels
    (batch_norm_act_depthwise, tested against torch in test_layers.py) and the block computes what the unfused
    layers compute, bit for bit: the same float32 operations. Outputs, running statistics, all gradients."""
    spec = BLOCKS[name]
    x = jnp.asarray(rng.standard_normal((6, 13, 11, spec.in_channels)), jnp.float32)

    def run(fuse):
        block = InvertedResidual(spec, fuse_train_bn=fuse, rng=np.random.default_rng(0))
        block.train()
        graphdef, params, rest = nnx.split(block, nnx.Param, ...)

        def loss(params, x):
            m = nnx.merge(graphdef, params, rest, copy=True)
            y = m(x)
            return jnp.sum(y * jnp.cos(y)), (y, nnx.state(m, nnx.BatchStat))

        step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        return step.lower(params, x).as_text(), step(params, x)

    fused_text, fused = run(True)
    unfused_text, unfused = run(False)
    assert fused_text.count("@resmobile_bn_act_depthwise_forward(") == 1
    assert fused_text.count("@resmobile_bn_act_depthwise_kernel_grad(") == 1
    assert "@resmobile_depthwise_forward(" not in fused_text and "bn_act_depthwise" not in unfused_text
    for got, want in zip(jax.tree.leaves(fused), jax.tree.leaves(unfused)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def random_bottleneck(inplanes: int, rng) -> blocks.Bottleneck:
    block = blocks.Bottleneck(inplanes, inplanes // 4, rng=np.random.default_rng(0))
    for layer in (block.conv_bn1, block.conv_bn2, block.conv_bn3):
        c = layer.bn.scale[...].shape[0]
        layer.bn.scale[...] = jnp.asarray(rng.standard_normal(c), jnp.float32)
        layer.bn.bias[...] = jnp.asarray(rng.standard_normal(c), jnp.float32)
        layer.bn.mean[...] = jnp.asarray(rng.standard_normal(c), jnp.float32)
        layer.bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
    block.eval()
    return block


# The tail's Bottleneck(160, 40) on 224 px (7x7) and 64 px (2x2) maps, a map with odd sides, and widths off the
# kernels' vector blocks (40 -> 10: panels 8 + 2; the 3x3 with 10 outputs takes the plain loop)
@pytest.mark.parametrize("inplanes,hw", [(160, (7, 7)), (160, (2, 2)), (160, (5, 9)), (40, (6, 7))])
def test_eval_bottleneck_runs_as_one_kernel_call(inplanes, hw, rng):
    block = random_bottleneck(inplanes, rng)
    x = jnp.asarray(rng.standard_normal((blocks.FUSED_BOTTLENECK_MIN_BATCH, *hw, inplanes)), jnp.float32)
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)

    def forward(params, x):
        return nnx.merge(graphdef, params, rest)(x)

    fused_text = jax.jit(forward).lower(params, x).as_text()
    assert fused_text.count("@resmobile_bottleneck_forward(") == 1 and "dot_general" not in fused_text
    block.conv_bn2.fuse_eval_bn = False
    graphdef_unfused = nnx.split(block, nnx.Param, ...)[0]

    def unfused(params, x):
        return nnx.merge(graphdef_unfused, params, rest)(x)

    assert "bottleneck" not in jax.jit(unfused).lower(params, x).as_text()
    want = np.asarray(unfused(params, x))
    np.testing.assert_allclose(np.asarray(forward(params, x)), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

    def gradients(f):  # frozen-BN fine-tuning differentiates the fused call
        return jax.grad(lambda p, x: jnp.sum(f(p, x) ** 2), argnums=(0, 1))(params, x)

    for got, want in zip(jax.tree.leaves(gradients(forward)), jax.tree.leaves(gradients(unfused))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_small_batches_and_batch_statistics_keep_the_bottleneck_as_xla_ops(rng):
    block = random_bottleneck(160, rng)

    def lowered(batch):
        graphdef, state = nnx.split(block)
        x = jnp.zeros((batch, 7, 7, 160), jnp.float32)
        return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).as_text()

    assert "bottleneck" not in lowered(blocks.FUSED_BOTTLENECK_MIN_BATCH - 1)
    assert "@resmobile_bottleneck_forward(" in lowered(blocks.FUSED_BOTTLENECK_MIN_BATCH)
    block.conv_bn3.bn.use_running_average = False  # one BN on batch statistics: the kernel cannot fold it
    assert "bottleneck" not in lowered(blocks.FUSED_BOTTLENECK_MIN_BATCH)
    block.conv_bn3.bn.use_running_average = True
    block.fuse_eval_block = False  # config.model.fuse_eval_bottleneck=False
    assert "bottleneck" not in lowered(blocks.FUSED_BOTTLENECK_MIN_BATCH)


def test_the_bottleneck_fusion_follows_the_config():
    from resmobile_jax.models import build_model

    def tail_fused(**model):
        return [b.fuse_eval_block for b in build_model(dict(variant="v1", embedding_dim=16, **model)).tail]

    assert tail_fused() == [True] * 6
    assert tail_fused(fuse_eval_bottleneck=False) == [False] * 6
    assert tail_fused(fuse_eval_bn=False) == [False] * 6  # fuse_eval_bn off turns every eval fusion off


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("channels", [960, 72, 44])  # 44 -> 16: chunks of 16 columns plus a part vector and scalars
def test_eval_squeeze_excitation_matches_torchvision(channels, batch, rng):
    """MobileNetV3's SE (torchvision.ops.SqueezeExcitation, Hardsigmoid scale) against ours in eval mode: up to
    SE_KERNEL_MAX_IMAGES images the scale is one C++ call (cpu_kernels.se_scale_forward), beyond that XLA's matmuls;
    gradients (frozen-BN fine-tuning) equal the XLA form's."""
    import torch
    from torchvision.ops import SqueezeExcitation as TorchSE
    from torchvision.models._utils import _make_divisible

    squeeze = _make_divisible(channels // 4, 8)
    reference = TorchSE(channels, squeeze, scale_activation=torch.nn.Hardsigmoid).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(p.shape).astype(np.float32) * 0.2))
    se = blocks.SqueezeExcitation(channels, squeeze, rng=np.random.default_rng(0))
    se.fc1.kernel[...] = jnp.asarray(reference.fc1.weight.detach().numpy()[:, :, 0, 0].T)
    se.fc1.bias[...] = jnp.asarray(reference.fc1.bias.detach().numpy())
    se.fc2.kernel[...] = jnp.asarray(reference.fc2.weight.detach().numpy()[:, :, 0, 0].T)
    se.fc2.bias[...] = jnp.asarray(reference.fc2.bias.detach().numpy())
    x = rng.standard_normal((batch, 5, 7, channels)).astype(np.float32)
    want = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()

    graphdef, params = nnx.split(se)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, eval_kernels=True))
    text = forward.lower(params, jnp.asarray(x)).as_text()
    assert ("@resmobile_se_scale_forward(" in text) == (batch <= blocks.SE_KERNEL_MAX_IMAGES)
    np.testing.assert_allclose(np.asarray(forward(params, jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)

    def gradients(eval_kernels):
        loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x, eval_kernels=eval_kernels) ** 2)
        return jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))

    for got, want_g in zip(jax.tree.leaves(gradients(True)), jax.tree.leaves(gradients(False))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want_g), rtol=1e-4,
                                   atol=1e-4 * float(jnp.abs(want_g).max()))


def test_the_se_kernel_limit_follows_the_config():
    """config.model.se_kernel_max_images reaches every SE: each runs as a C++ call up to that many images, none at 0
    (what `bench.ab --option se_kernel_max_images` compares)."""
    from resmobile_jax.models import build_model

    num_se = sum(spec.use_se for spec in mid_block_specs("v2", 32))

    def se_kernel_calls(batch, **model):
        net = build_model(dict(variant="v2", embedding_dim=16, **model))
        graphdef, state = nnx.split(net)
        x = jnp.zeros((batch, 64, 64, 3), jnp.float32)
        return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).as_text().count("@resmobile_se_scale_forward(")

    assert num_se > 0
    assert se_kernel_calls(1) == num_se  # the default, blocks.SE_KERNEL_MAX_IMAGES
    assert se_kernel_calls(blocks.SE_KERNEL_MAX_IMAGES + 1) == 0
    assert se_kernel_calls(1, se_kernel_max_images=0) == 0
    assert se_kernel_calls(2, se_kernel_max_images=2) == num_se
    assert se_kernel_calls(3, se_kernel_max_images=2) == 0
    assert se_kernel_calls(1, fuse_eval_bn=False, depthwise_impl="shifted") == 0  # no C++ kernels: XLA's SE


def test_the_pointwise_kernel_limit_follows_the_config():
    """config.model.pointwise_kernel_max_pixels reaches every 1x1 conv of the mid and tail: at 224 px, batch 1, the
    7x7 stage's (49 pixels) run as C++ calls: block 12's projection, blocks 13-14's expansion and projection, the six
    bottlenecks' two 1x1s (at batch 1 the bottlenecks are not one fused call); none at 0, none with 14x14 maps."""
    from resmobile_jax.models import build_model
    from resmobile_jax.models.resmobilenet import XLA_ONLY

    def pointwise_calls(batch, **model):
        net = build_model(dict(variant="v2", embedding_dim=16, **model))
        graphdef, state = nnx.split(net)
        x = jnp.zeros((batch, 224, 224, 3), jnp.float32)
        lowered = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).as_text()
        return lowered.count("@resmobile_pointwise_forward_bn_act(")

    assert pointwise_calls(1) == 1 + 2 * 2 + 6 * 2
    assert pointwise_calls(1, pointwise_kernel_max_pixels=0) == 0
    assert pointwise_calls(1, pointwise_kernel_max_pixels=195) == 17  # the 14x14 maps have 196 pixels
    assert pointwise_calls(1, pointwise_kernel_max_pixels=196) > 17
    assert pointwise_calls(2) == 0  # 98 pixels at 7x7
    assert pointwise_calls(1, **XLA_ONLY) == 0  # what portable exports build (export.check.float32_copy)
