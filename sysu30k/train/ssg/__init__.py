"""``sysu30k train-ssg``: Self-similarity Grouping (SSG, SSG++), clustering-based domain adaptation on the
same shards, loader, loop and evaluator.

``config`` (its options and the stages' defaults), ``rerank`` (sparse k-reciprocal distance, eps, DBSCAN),
``losses``, ``quality`` (NMI/ARI), ``plus`` (SSG++'s labelled stream), ``train`` (the stages). May import
what ``sysu30k.train`` may.
"""
