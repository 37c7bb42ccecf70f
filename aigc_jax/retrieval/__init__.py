"""Retrieval: passage embeddings from a sentence encoder, kept in a folder and searched
exactly (`aigc_jax.retrieval.index`); the metrics and a BM25 baseline are in
`aigc_jax.evaluation.retrieval`, the standard-library corpus in `aigc_jax.data.docs_corpus`.
"""
