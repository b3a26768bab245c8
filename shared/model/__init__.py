"""The model family: the torch module, its training, surgery, releases, adaptors and mapping."""
