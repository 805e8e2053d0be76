"""The token bottleneck: wire step states (top-k, embeddings, logits) to decoded steps, the dense decoders, the embedding matrix and the vocabulary."""
