import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resmobile_jax.convert.torch_reference import build_reference
from resmobile_jax.models import ResMobileNet, build_model, output_stride


@pytest.mark.parametrize("variant,os_,expected", [("v1", 32, 32), ("v2", 32, 32), ("v2", 64, 64)])
def test_output_stride_and_shapes(variant, os_, expected):
    assert output_stride(variant, os_) == expected
    model = build_model(dict(variant=variant, embedding_dim=48, v2_output_stride=os_))
    stages = jax.eval_shape(lambda x: model.stages(x), jax.ShapeDtypeStruct((3, 128, 192, 3), jnp.float32))
    chex.assert_shape(stages["tail.5"], (3, 128 // expected, 192 // expected, 160))
    chex.assert_shape(stages["stem"], (3, None, None, 16 if variant == "v1" else 64))
    chex.assert_shape(stages["embedding"], (3, 48))
    chex.assert_type(stages["embedding"], jnp.float32)


@pytest.mark.parametrize("variant,os_", [("v1", 32), ("v2", 32), ("v2", 64)])
def test_parameter_counts_match_the_torch_reference(variant, os_):
    model = build_model(dict(variant=variant, embedding_dim=512, v2_output_stride=os_))
    ours = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ref = build_reference(variant, 512, os_)
    assert ours == sum(p.numel() for p in ref.parameters())


def test_embeddings_are_unit_norm_float32_even_in_bfloat16():
    model = build_model(dict(variant="v2", embedding_dim=64, dtype="bfloat16"))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
    emb = nnx.jit(lambda m, images: m(images))(model, x)  # eager bf16 would compile op by op
    chex.assert_type(emb, jnp.float32)
    chex.assert_type(nnx.jit(lambda m, images: m.stages(images)["tail.5"])(model, x), jnp.bfloat16)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=-1), 1.0, atol=1e-5)
    p = nnx.state(model, nnx.Param)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(p))


@pytest.mark.parametrize("variant,os_,bad", [("v1", 32, (31, 64)), ("v2", 32, (64, 20)), ("v2", 64, (48, 48))])
def test_too_small_input_is_a_clear_error(variant, os_, bad):
    model = build_model(dict(variant=variant, embedding_dim=8, v2_output_stride=os_))
    with pytest.raises(ValueError, match=rf"smaller than .*output stride {output_stride(variant, os_)}"):
        model(jnp.zeros((1, *bad, 3)))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="unknown model variant 'v3'"):
        ResMobileNet("v3")
    with pytest.raises(ValueError, match="embedding_dim must be a positive integer"):
        ResMobileNet("v1", embedding_dim=0)
    with pytest.raises(ValueError, match="v2_output_stride must be 32 or 64"):
        ResMobileNet("v2", v2_output_stride=16)
    with pytest.raises(ValueError, match="NHWC RGB"):
        build_model(dict(variant="v1", embedding_dim=8))(jnp.zeros((1, 3, 64, 64)))


def test_same_seed_same_weights_different_seed_different_weights():
    from resmobile_jax.checkpoint import model_state_dict

    a = model_state_dict(build_model(dict(variant="v1", embedding_dim=8), seed=1))
    b = model_state_dict(build_model(dict(variant="v1", embedding_dim=8), seed=1))
    c = model_state_dict(build_model(dict(variant="v1", embedding_dim=8), seed=2))
    k = "mid.3.se.fc1.kernel"
    np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a[k], c[k])


def test_init_statistics_match_torchvision():
    """Same init scheme as the reference: per-tensor std within sampling error."""
    from resmobile_jax.checkpoint import model_state_dict
    from resmobile_jax.convert.layout import canonical_layout

    flax_sd = model_state_dict(build_model(dict(variant="v2", embedding_dim=512)))
    ref = build_reference("v2", 512).state_dict()
    for e in canonical_layout("v2"):
        if e.kind in ("conv", "linear", "fc1x1") and flax_sd[e.flax_key].size >= 2000:
            ours, theirs = float(flax_sd[e.flax_key].std()), float(ref[e.torch_key].float().std())
            assert abs(ours / theirs - 1) < 0.1, (e.torch_key, ours, theirs)
        if e.kind == "vector" and e.flax_key.endswith(("scale", "var")):
            np.testing.assert_array_equal(flax_sd[e.flax_key], ref[e.torch_key].numpy())
