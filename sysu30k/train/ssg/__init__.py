"""Self-similarity Grouping (SSG, SSG++): clustering-based domain adaptation on the same shards and loader."""
