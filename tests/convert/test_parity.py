"""The converted Flax model computes what the torchvision reference computes, stage by stage."""

import numpy as np
import pytest
import torch

from resmobile_jax.convert.check import TOLERANCE, parity_check, stage_diffs
from resmobile_jax.convert.core import flax_to_torch, torch_to_flax
from resmobile_jax.convert.torch_reference import build_reference, randomize
from resmobile_jax.models import build_model

MODELS = [("v1", 32), ("v2", 32), ("v2", 64)]
SIZES = [(64, 96), (128, 128)]  # a non-square one and a square one


@pytest.mark.slow
@pytest.mark.parametrize("variant,output_stride", MODELS)
@pytest.mark.parametrize("size", SIZES)
def test_converted_model_matches_reference_per_stage(variant, output_stride, size):
    result = parity_check(variant, v2_output_stride=output_stride, image_size=size, batch=2, seed=1)
    for name, stage in result["stages"].items():
        assert stage["ok"], f"{name}: {stage}"
    assert result["embedding_max_abs_diff"] <= 1e-5
    assert result["round_trip_bit_exact"]
    assert result["passed"]
    assert len(result["stages"]) == 1 + 15 + 6 + 1


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_the_fused_eval_kernels_the_bench_runs_match_reference_per_stage(variant):
    """Batch 8 at 224 px runs the eval paths of the bench and of evaluation, which batch 2 above does not: inverted
    residuals fused into C++ calls (expanded maps over blocks.FUSED_BLOCK_MIN_BYTES) and the tail's bottlenecks as one
    call each (blocks.FUSED_BOTTLENECK_MIN_BATCH images)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from resmobile_jax.models import blocks

    batch = 8
    assert batch >= blocks.FUSED_BOTTLENECK_MIN_BATCH
    model = build_model(dict(variant=variant, embedding_dim=512))
    model.eval()
    graphdef, state = nnx.split(model)
    stages = jax.jit(lambda s, x: nnx.merge(graphdef, s).stages(x))  # what parity_check runs (models.jit_stages)
    text = stages.lower(state, jnp.zeros((batch, 224, 224, 3), jnp.float32)).as_text()
    assert text.count("@resmobile_bottleneck_forward(") == 6
    assert "@resmobile_inverted_residual_forward(" in text and "@resmobile_se_project_forward(" in text
    result = parity_check(variant, image_size=(224, 224), batch=batch, seed=1)
    for name, stage in result["stages"].items():
        assert stage["ok"], f"{name}: {stage}"
    assert result["embedding_max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("variant,output_stride", MODELS)
def test_depthwise_implementations_agree_on_the_whole_network(variant, output_stride):
    ref = randomize(build_reference(variant, 64, output_stride), seed=2)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    images = np.random.default_rng(0).standard_normal((2, 3, 96, 64)).astype(np.float32)
    diffs = {}
    for impl, pointwise, stem in (("xla", "conv", "xla"), ("shifted", "matmul", "xla"), ("cpu_kernel", "matmul", "cpu_kernel")):
        model = build_model(dict(variant=variant, embedding_dim=64, v2_output_stride=output_stride, depthwise_impl=impl,
                                 pointwise_impl=pointwise, stem_conv_impl=stem))
        torch_to_flax(sd, model)
        diffs[impl] = stage_diffs(ref, model, images)
        assert all(s["ok"] for s in diffs[impl].values()), diffs[impl]
        assert diffs[impl]["embedding"]["max_abs_diff"] <= TOLERANCE


@pytest.mark.parametrize("variant,output_stride,size", [("v1", 32, 64), ("v2", 32, 64), ("v2", 64, 128)])
def test_train_mode_gradients_match_torch_autograd(variant, output_stride, size):
    """The whole training path with the default implementations (on this CPU: the C++ depthwise and stem-conv
    kernels, 1x1 convs as matmuls, the hand-written max-pool gradient): every parameter's gradient, in train mode, is
    within 2% (relative L2) of torch's float64 gradient, or within 5x torch's own float32 error if that is larger.

    Why not "as close as torch float32" alone: a ReLU/hard-swish network's gradient jumps where float32 rounding moves
    one of the ~5e5 activations across a kink, and at batch 4 on 8x8 maps one element is 1/256 of a channel's
    batch-norm gradient sum. Whether any activation crosses is chance: torch float32 and XLA's depthwise happen not to
    here, two equally exact C++ depthwise kernels (per-layer error ~2e-6 against torch) split, the unlucky one moving
    one BN bias gradient by 0.5%. A wrong gradient (transposed or shifted kernel, dropped tap or term) is off by tens
    of percent; tests/models/test_layers.py holds each op to 1e-5."""
    import copy

    import jax.numpy as jnp
    from flax import nnx

    ref = randomize(build_reference(variant, 32, output_stride), seed=5)
    ref64 = copy.deepcopy(ref).double()
    model = build_model(dict(variant=variant, embedding_dim=32, v2_output_stride=output_stride))
    torch_to_flax({k: v.numpy() for k, v in ref.state_dict().items()}, model)
    rng = np.random.default_rng(2)
    images = rng.standard_normal((4, 3, size, size)).astype(np.float32)
    cotangent = rng.standard_normal((4, 32)).astype(np.float32)
    for net, dtype in ((ref, torch.float32), (ref64, torch.float64)):
        net.train()
        (net(torch.from_numpy(images).to(dtype)) * torch.from_numpy(cotangent).to(dtype)).sum().backward()
    model.train()
    grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) * cotangent)))(model, jnp.asarray(images.transpose(0, 2, 3, 1)))
    nnx.update(model, grads)  # the model's parameters now hold their gradients, so the converter names them
    ours = flax_to_torch(model)
    exact = dict(ref64.named_parameters())
    for name, p in ref.named_parameters():
        truth = exact[name].grad.numpy()
        scale = max(float(np.linalg.norm(truth)), 1e-2)  # some BN biases' true gradients are ~0
        ours_err = float(np.linalg.norm(ours[name] - truth)) / scale
        torch_err = float(np.linalg.norm(p.grad.numpy() - truth)) / scale
        assert ours_err <= max(0.02, 5 * torch_err), f"{name}: relative error {ours_err:.3g} (torch float32's: {torch_err:.3g})"


@pytest.mark.parametrize("variant,output_stride", MODELS)
def test_torch_flax_torch_round_trip_is_bit_exact(variant, output_stride):
    ref = randomize(build_reference(variant, 32, output_stride), seed=3)
    sd = ref.state_dict()
    model = build_model(dict(variant=variant, embedding_dim=32, v2_output_stride=output_stride))
    torch_to_flax({k: v.numpy() for k, v in sd.items()}, model)
    back = flax_to_torch(model)
    assert list(back) == list(sd)  # same keys, same order as the reference's state_dict
    for k, v in sd.items():
        assert back[k].dtype == v.numpy().dtype, k
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
    fresh = build_reference(variant, 32, output_stride)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_reference_v1_is_torchvision_mobilenet_v3_large_features():
    """The V1 reference's stem+mid is torchvision's own mobilenet_v3_large().features[0:16], tensor for tensor."""
    import torchvision

    ref = build_reference("v1").state_dict()
    features = torchvision.models.mobilenet_v3_large(weights=None).features.state_dict()
    expected = {}
    for k, v in features.items():
        idx, rest = k.split(".", 1)
        if int(idx) == 0:
            expected[f"stem.{rest}"] = v.shape
        elif int(idx) <= 15:
            expected[f"mid.{int(idx) - 1}.{rest}"] = v.shape
    ours = {k: v.shape for k, v in ref.items() if k.startswith(("stem.", "mid."))}
    assert ours == expected


def test_train_mode_forward_updates_batch_stats_like_pytorch():
    """One train-mode forward of the whole network: same output and same running statistics in every BN."""
    import jax.numpy as jnp
    from flax import nnx

    from resmobile_jax.checkpoint import model_state_dict

    ref = randomize(build_reference("v2", 32), seed=4)
    model = build_model(dict(variant="v2", embedding_dim=32))
    torch_to_flax({k: v.numpy() for k, v in ref.state_dict().items()}, model)
    x = np.random.default_rng(1).standard_normal((4, 3, 64, 64)).astype(np.float32)
    ref.train()
    with torch.no_grad():
        t_out = ref(torch.from_numpy(x)).numpy()
    model.train()
    f_out = np.asarray(nnx.jit(lambda m, images: m(images))(model, jnp.asarray(x.transpose(0, 2, 3, 1))))
    # Batch statistics over 4 images of 2x2 tail maps amplify float32 rounding ~10x relative to eval mode.
    np.testing.assert_allclose(f_out, t_out, atol=1e-4)
    after = flax_to_torch(model)
    for k, v in ref.state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(after[k], v.numpy(), rtol=1e-4, atol=1e-5, err_msg=k)
        elif k.endswith("num_batches_tracked"):
            assert after[k] == v.item(), k
    assert model_state_dict(model)["stem.conv_bn_act.bn.num_batches_tracked"] > 0
