"""Storage: the store protocols, their implementations, and the cache that opens them."""
