"""lmcycle: a language model through the whole generative-AI lifecycle, one recipe and one report."""

import logging as _logging

__version__ = "0.1.0"

# transformers imports torchao whenever it is installed; torchao then warns that its CUDA-only kernels
# (mxfp8, cutlass) do not load on this build, and torch's pytree warns about torchao's enum registrations.
# Neither affects anything lmcycle runs, and both would print before every command.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
