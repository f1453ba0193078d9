"""The one place that knows what the installed transformers calls a model's key/value cache.

transformers 5.24 renamed the forward argument and the output field ``past_key_values`` to ``cache``: the old
name still works there but warns (a FutureWarning on every decoding step) and goes away in 5.40, while 5.0-5.23
know only the old name. We support ``transformers>=5.0,<6``, so the name is detected once, from the output
dataclass every causal LM returns, instead of from version numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_ARG = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` to a model's forward under this transformers' name for it."""
    return {CACHE_ARG: cache}


def cache_of(out: Any) -> Any:
    """The key/value cache a model's forward returned (``None`` when it ran without ``use_cache``)."""
    return getattr(out, CACHE_ARG, None)
