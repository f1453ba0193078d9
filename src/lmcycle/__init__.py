"""lmcycle: a language model through the whole generative-AI lifecycle, one recipe and one report."""

__version__ = "0.1.0"
