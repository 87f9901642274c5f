"""Retrieval beyond a test split: an index of a gallery's embeddings that shortlists candidates for a query,
so that the exact (cross-attention) score runs on k items instead of the whole gallery.

One job per module; import from them directly (this package imports nothing, so the light ones stay light):

- `meta`: `index.json`, the identities of checkpoint, store and captions, and the checks that refuse a mix;
- `shards`: float16 embedding shards, written atomically (a build resumes at the first missing one), mapped;
- `encode`: the model's own encoders on gallery images, caption sets and queries;
- `kmeans`: FAISS spherical k-means and exact nearest-centroid assignment (GPU when FAISS has one);
- `residuals`: product-quantised residuals (row - centroid), m bytes a row, for cheap product corrections;
- `tokens`: SCAN's token-level (ColBERT/PLAID-style) centroid lists and shortlists;
- `globals`: MMCA's FAISS inner-product index over its global embeddings;
- `build`: `build_index(checkpoint, features, out, ...)`, incremental and resumable;
- `reader`: `SearchIndex.open(index_dir, checkpoint=..., features=...)` for `pipeline.search`.
"""
