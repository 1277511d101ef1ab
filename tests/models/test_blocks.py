"""The blocks' eval-mode kernel fusion: an inverted residual's expansion BN + activation, its depthwise conv, BN and
activation in one C++ kernel call, computing what the unfused layers compute (themselves tested against torch in
test_layers.py; the whole network in eval mode against torchvision in tests/convert/test_parity.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resmobile_jax.models.architecture import MOBILENET_V3_LARGE_BLOCKS
from resmobile_jax.models.blocks import InvertedResidual


def random_bn_statistics(block, rng):
    for layer in (block.expand, block.depthwise, block.project):
        c = layer.bn.scale[...].shape[0]
        layer.bn.scale[...] = jnp.asarray(rng.standard_normal(c), jnp.float32)
        layer.bn.bias[...] = jnp.asarray(rng.standard_normal(c), jnp.float32)
        layer.bn.mean[...] = jnp.asarray(rng.standard_normal(c), jnp.float32)
        layer.bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)


# ReLU and Hardswish, kernel 3 and 5, stride 1 and 2, with and without squeeze-excitation
@pytest.mark.parametrize("index", [1, 2, 3, 6, 11])
def test_eval_inverted_residual_runs_expansion_bn_inside_the_depthwise_kernel(index, rng):
    spec = MOBILENET_V3_LARGE_BLOCKS[index]
    block = InvertedResidual(spec, rng=np.random.default_rng(0))
    random_bn_statistics(block, rng)
    block.eval()
    x = jnp.asarray(rng.standard_normal((2, 13, 11, spec.in_channels)), jnp.float32)

    def compiled(block):
        graphdef, params, rest = nnx.split(block, nnx.Param, ...)

        def forward(params, x):
            return nnx.merge(graphdef, params, rest)(x)

        return forward, params, jax.jit(forward).lower(params, x).as_text()

    fused, params, fused_text = compiled(block)
    assert "resmobile_depthwise_forward_bn_act_in" in fused_text and "@resmobile_depthwise_forward(" not in fused_text
    block.expand.fuse_eval_bn = block.depthwise.fuse_eval_bn = False
    unfused, _, unfused_text = compiled(block)
    assert "@resmobile_depthwise_forward(" in unfused_text and "_bn_act" not in unfused_text

    np.testing.assert_allclose(np.asarray(fused(params, x)), np.asarray(unfused(params, x)), rtol=1e-5, atol=2e-5)

    def gradients(forward):  # frozen-BN fine-tuning differentiates the fused call
        return jax.grad(lambda p, x: jnp.sum(forward(p, x) ** 2), argnums=(0, 1))(params, x)

    for got, want in zip(jax.tree.leaves(gradients(fused)), jax.tree.leaves(gradients(unfused))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
