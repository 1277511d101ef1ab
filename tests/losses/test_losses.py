"""Every loss: value and gradients equal pytorch-metric-learning's on the same embeddings, labels and proxies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from resmobile_jax.losses import LOSSES, get_loss, init_class_vectors

NUM_CLASSES = 6


def pml_reference(name, num_classes, dim):
    """(loss module, miner or None) built with the library's defaults."""
    if name == "triplet":
        return pml_losses.TripletMarginLoss(), pml_miners.BatchHardMiner()
    if name == "multi_similarity":
        return pml_losses.MultiSimilarityLoss(), pml_miners.MultiSimilarityMiner()
    simple = {"contrastive": pml_losses.ContrastiveLoss, "supcon": pml_losses.SupConLoss, "ntxent": pml_losses.NTXentLoss}
    if name in simple:
        return simple[name](), None
    proxy = {"arcface": pml_losses.ArcFaceLoss, "cosface": pml_losses.CosFaceLoss,
             "proxy_anchor": pml_losses.ProxyAnchorLoss, "normalized_softmax": pml_losses.NormalizedSoftmaxLoss}
    return proxy[name](num_classes=num_classes, embedding_size=dim), None


def batches():
    rng = np.random.default_rng(0)
    yield "pk", rng.standard_normal((16, 8)).astype(np.float32), np.repeat(np.arange(4), 4)
    # shuffled, with a class of one image (no positive) and a class absent from the batch
    labels = np.array([0, 1, 1, 2, 2, 2, 3, 0, 5, 1, 2, 0])
    yield "ragged", rng.standard_normal((12, 8)).astype(np.float32), labels
    # tightly clustered embeddings: miners and margins switch on and off
    centers = rng.standard_normal((3, 8))
    labels = np.arange(15) % 3
    yield "clustered", (centers[labels] + 0.3 * rng.standard_normal((15, 8))).astype(np.float32), labels


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("batch", list(batches()), ids=lambda b: b[0])
def test_loss_and_gradients_match_pytorch_metric_learning(name, batch):
    _, emb, labels = batch
    loss = get_loss(name)
    params = init_class_vectors(NUM_CLASSES, emb.shape[1], seed=1) if loss.uses_proxies else {}

    ref_loss, miner = pml_reference(name, NUM_CLASSES, emb.shape[1])
    if loss.uses_proxies:
        w = torch.from_numpy(np.array(params["proxies"]))
        with torch.no_grad():
            if name == "proxy_anchor":
                ref_loss.proxies.copy_(w)
            else:
                ref_loss.W.copy_(w.T)  # pytorch-metric-learning stores (D, C)
    t_emb = torch.from_numpy(emb).requires_grad_(True)
    t_labels = torch.from_numpy(labels)
    ref = ref_loss(t_emb, t_labels, miner(t_emb, t_labels)) if miner else ref_loss(t_emb, t_labels)
    ref.backward()

    value, (g_emb, g_params) = jax.value_and_grad(loss.fn, argnums=(0, 2))(jnp.asarray(emb), jnp.asarray(labels), params)
    np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_emb), t_emb.grad.numpy(), rtol=1e-4, atol=1e-6)
    if loss.uses_proxies:
        ref_grad = (ref_loss.proxies.grad if name == "proxy_anchor" else ref_loss.W.grad.T).numpy()
        np.testing.assert_allclose(np.asarray(g_params["proxies"]), ref_grad, rtol=1e-4, atol=1e-6)
    if batch[0] != "clustered":  # well-separated clusters may leave nothing to mine; elsewhere a 0 would hide bugs
        assert float(value) > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_jit_and_handle_a_batch_without_positives(name):
    loss = get_loss(name)
    params = init_class_vectors(NUM_CLASSES, 8) if loss.uses_proxies else {}
    emb = jnp.asarray(np.random.default_rng(3).standard_normal((6, 8)), jnp.float32)
    labels = jnp.arange(6)
    value = jax.jit(loss.fn)(emb, labels, params)
    assert np.isfinite(float(value))
    if name in ("triplet", "multi_similarity", "supcon", "ntxent"):
        assert float(value) == 0.0  # no positive pair: nothing to learn from, and no nan
    elif name == "contrastive":
        assert float(value) > 0  # its negative term still pushes apart pairs closer than the margin
    grads = jax.grad(loss.fn)(emb, labels, params)
    assert np.all(np.isfinite(np.asarray(grads)))


def test_hand_worked_triplet_example():
    """Two classes on a circle: anchor (1,0); positives (0,1) and (1,0)-ish; negative (-1,0)."""
    emb = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [-0.6, 0.8]])
    labels = jnp.array([0, 0, 1, 1])
    # d(0,1)=sqrt2, d(0,2)=2, d(0,3)=sqrt(3.2), d(1,2)=sqrt2, d(1,3)=sqrt(0.4), d(2,3)=sqrt(0.8)
    # anchor 0: hp=sqrt2, hn=sqrt3.2 -> relu(1.414-1.789+0.5)=0.125; anchor 1: hp=sqrt2, hn=sqrt0.4 -> 1.282
    # anchor 2: hp=sqrt0.8, hn=sqrt2 -> relu(0.894-1.414+0.5)=0 ; anchor 3: hp=sqrt0.8, hn=sqrt0.4 -> 0.762
    expected = np.mean([np.sqrt(2) - np.sqrt(3.2) + 0.5, np.sqrt(2) - np.sqrt(0.4) + 0.5, np.sqrt(0.8) - np.sqrt(0.4) + 0.5])
    assert abs(float(get_loss("triplet", margin=0.5).fn(emb, labels, {})) - expected) < 1e-6


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="unknown loss 'tripplet'; choose one of arcface, contrastive"):
        get_loss("tripplet")
