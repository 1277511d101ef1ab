"""Pictures of an embedding space: t-SNE scatter plots, cluster-quality figures, and a retrieval grid, as PNG.

t-SNE runs on a fixed, class-stratified subsample (the same images for every model compared, the same seed), because
its picture depends on which points it sees. Cluster quality is measured in the embedding space itself, not on the
2-D picture: the silhouette score under cosine distance, and the NMI between k-means clusters and the labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def stratified_sample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of about `n` items with (nearly) equal numbers per class; all items when there are fewer."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = max(1, n // len(classes))
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.sort(np.concatenate(picked))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cluster_quality(embeddings: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Silhouette score of the true classes under cosine distance (-1..1, higher = tighter, better separated
    classes) and NMI of k-means (k = number of classes, on unit vectors) against the labels (0..1)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score, silhouette_score

    x, labels = _unit(embeddings), np.asarray(labels)
    k = len(np.unique(labels))
    if k < 2:
        raise ValueError("cluster quality needs at least 2 classes")
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    return {
        "silhouette_cosine": float(silhouette_score(x, labels, metric="cosine")),
        "kmeans_nmi": float(normalized_mutual_info_score(labels, clusters)),
        "points": int(len(x)),
    }


def tsne_2d(embeddings: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE of unit-normalized embeddings with cosine affinities (the metric retrieval ranks by)."""
    from sklearn.manifold import TSNE

    x = _unit(embeddings)
    perplexity = min(perplexity, (len(x) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed).fit_transform(x)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def save_tsne(path: str | Path, panels: list[tuple[str, np.ndarray]], labels: np.ndarray, class_names: list[str]) -> Path:
    """One scatter panel per (title, (N, 2) points), side by side, coloured by class, one shared legend."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 6), squeeze=False)
    labels = np.asarray(labels)
    for ax, (title, points) in zip(axes[0], panels):
        for c in np.unique(labels):
            m = labels == c
            ax.scatter(points[m, 0], points[m, 1], s=4, alpha=0.7, color=_COLORS[c % len(_COLORS)],
                       label=class_names[c] if c < len(class_names) else str(c))
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 5 * len(panels)), markerscale=4, fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_retrieval_grid(path: str | Path, images, labels: np.ndarray, queries: np.ndarray, neighbours: np.ndarray,
                        scores: np.ndarray, class_names: list[str], title: str = "") -> Path:
    """Rows: a query image, then its top-K results with cosine scores; green frame = same class, red = wrong, gray =
    a label unknown (-1).
    `images[i]` is an (H, W, 3) uint8 array (the evaluation crop the model saw)."""
    plt = _pyplot()
    k = neighbours.shape[1]
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.6 * (k + 1), 1.75 * len(queries)), squeeze=False)
    for row, q in enumerate(queries):
        cells = [(q, None)] + [(int(n), float(s)) for n, s in zip(neighbours[row], scores[row])]
        for col, (i, score) in enumerate(cells):
            ax = axes[row][col]
            ax.imshow(images[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            name = class_names[labels[i]] if 0 <= labels[i] < len(class_names) else ("" if labels[i] < 0 else str(labels[i]))
            if score is None:
                ax.set_title(f"query: {name}" if name else "query", fontsize=7)
                color, width = "black", 2
            else:
                known = labels[i] >= 0 and labels[q] >= 0  # unlabelled (-1): no right or wrong to show
                color = "gray" if not known else "green" if labels[i] == labels[q] else "red"
                ax.set_title(f"{score:.3f} {name}".strip(), fontsize=7, color=color)
                width = 3
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(width)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
