"""The conditional VAE as a plain torch module: layers, condition tables, likelihoods, MMD."""
