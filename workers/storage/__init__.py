"""Where data lives: dataset sources, staged input shards and result objects, local or behind fsspec URLs."""
