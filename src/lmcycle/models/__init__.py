"""Models: load any HF causal LM or encoder-decoder, build small ones, decode."""
