"""python -m resmobile_jax.search --checkpoint RUN_OR_MODEL --gallery gallery.npz QUERY_IMAGE... [--k 5]

Embeds the query images with the model, finds their top-K gallery matches by cosine similarity, prints a Markdown
table and draws a PNG grid (query, then its matches with scores). Exact search by default (chunked matrix products on
the device); `--index faiss` uses a faiss HNSW index (approximate, for galleries of millions), built on first use and
saved beside the gallery.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from absl import flags

from resmobile_jax import cli

FLAGS = flags.FLAGS

def check_queries(paths) -> None:
    """Every query must be a readable image; says which one is not, and why."""
    from resmobile_jax.data.sources import check_image_file

    for p in paths:
        if not Path(p).is_file():
            raise ValueError(f"query {p} does not exist or is not a file")
        reason = check_image_file(p)
        if reason:
            raise ValueError(f"query {p} is not an image this tool can read ({reason}); pass JPEG/PNG/WebP/BMP/GIF/TIFF "
                             "files")


def faiss_search(gallery_path: Path, gallery_embeddings: np.ndarray, queries: np.ndarray, k: int):
    """Approximate inner-product search with an HNSW index cached as GALLERY.faiss (rebuilt when the gallery is newer)."""
    try:
        import faiss
    except ImportError:
        raise ValueError("--index faiss needs the faiss package: pip install faiss-cpu (or use --index exact)") from None
    index_path = gallery_path.with_suffix(".faiss")
    if index_path.is_file() and index_path.stat().st_mtime >= gallery_path.stat().st_mtime:
        index = faiss.read_index(str(index_path))
    else:
        index = faiss.IndexHNSWFlat(gallery_embeddings.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.add(np.ascontiguousarray(gallery_embeddings, np.float32))
        faiss.write_index(index, str(index_path))
    index.hnsw.efSearch = max(64, 2 * k)
    scores, neighbours = index.search(np.ascontiguousarray(queries, np.float32), k)
    return scores, neighbours


def search(checkpoint, gallery_path, queries: list[str], k: int = 5, index: str = "exact", batch_size: int = 64):
    """(gallery, query embeddings, scores (Q, k), gallery indices (Q, k)) after every compatibility check."""
    from resmobile_jax.checkpoint import model_fingerprint
    from resmobile_jax.embed import embed_files
    from resmobile_jax.evaluate import load_checkpoint
    from resmobile_jax.gallery import load_gallery
    from resmobile_jax.retrieval import knn

    if not queries:
        raise ValueError("no query images given: python -m resmobile_jax.search --checkpoint C --gallery G IMAGE...")
    check_queries(queries)
    gallery = load_gallery(gallery_path)
    loaded = load_checkpoint(checkpoint)
    gallery.check_model(model_fingerprint(loaded.model), loaded.model.embedding_dim, str(checkpoint))
    hw = tuple(gallery.meta["input_hw"])  # the queries must be seen at the size the gallery was embedded at
    embedded = embed_files(loaded, queries, hw, batch_size)
    k = min(k, len(gallery.paths))
    if index == "faiss":
        scores, neighbours = faiss_search(Path(gallery_path), gallery.embeddings, embedded, k)
    else:
        scores, neighbours = knn(embedded, gallery.embeddings, k=k)
    return gallery, embedded, scores, neighbours


def results_table(gallery, queries, scores, neighbours) -> str:
    rows = ["| query | rank | score | match | label |", "|---|---:|---:|---|---|"]
    for q, (s_row, n_row) in enumerate(zip(scores, neighbours)):
        for rank, (s, n) in enumerate(zip(s_row, n_row), 1):
            label = gallery.labels[n]
            name = gallery.class_names[label] if label >= 0 else ""
            rows.append(f"| {queries[q] if rank == 1 else ''} | {rank} | {s:.4f} | {gallery.paths[n]} | {name} |")
    return "\n".join(rows)


def draw(png: str, gallery, queries, scores, neighbours) -> Path:
    from resmobile_jax.data.preprocess import Preprocess
    from resmobile_jax.gallery import UNLABELLED
    from resmobile_jax.visualize import save_retrieval_grid

    preprocess = Preprocess(*gallery.meta["input_hw"])
    n = len(gallery.paths)
    crops = {n + q: preprocess.eval_image(p) for q, p in enumerate(queries)}  # queries after the gallery items
    for i in np.unique(neighbours):
        try:
            crops[int(i)] = preprocess.eval_image(gallery.paths[i])
        except OSError:  # the gallery's files moved since it was embedded: a blank cell, the scores still stand
            crops[int(i)] = np.full((preprocess.height, preprocess.width, 3), 255, np.uint8)
    labels = np.concatenate([gallery.labels, np.full(len(queries), UNLABELLED, np.int32)])
    return save_retrieval_grid(png, crops, labels, np.arange(n, n + len(queries)), neighbours, scores,
                               gallery.class_names, title=f"top-{neighbours.shape[1]} matches in {len(gallery.paths)} images")


def main(argv):
    cli.start_command(argv, accepts_arguments=True)  # the query images
    queries = argv[1:]
    try:
        gallery, _, scores, neighbours = search(FLAGS.checkpoint, FLAGS.gallery, queries, FLAGS.k, FLAGS.index,
                                                FLAGS.batch_size)
    except ValueError as e:  # GalleryError, EvaluationError and bad queries carry a message for the user
        sys.exit(f"error: {e}")
    print(results_table(gallery, queries, scores, neighbours))
    if FLAGS.png:
        print(f"wrote {draw(FLAGS.png, gallery, queries, scores, neighbours)}")


if __name__ == "__main__":  # flags defined only when run: importing search() defines none
    flags.DEFINE_string("checkpoint", None, "the model that embedded the gallery (a run's workdir or a model checkpoint)")
    flags.DEFINE_string("gallery", None, "gallery file from python -m resmobile_jax.embed")
    flags.DEFINE_integer("k", 5, "matches per query")
    flags.DEFINE_string("png", "search.png", "PNG grid of the results ('' for none)")
    flags.DEFINE_enum("index", "exact", ["exact", "faiss"], "exact search, or a faiss HNSW index (pip install faiss-cpu)")
    flags.DEFINE_integer("batch_size", 64, "query images per jitted call")
    flags.mark_flags_as_required(["checkpoint", "gallery"])
    cli.run(main)
