"""Models larger than memory: expert cache, prefetching, routing statistics."""
