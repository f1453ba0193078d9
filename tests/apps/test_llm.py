"""LLM backends: the in-process model and an OpenAI-compatible server (lmcycle serve, through the official client)
give the same text for the same prompts and settings."""

from __future__ import annotations

import pytest
import torch
from loopback import running

from lmcycle.apps.llm import LLM, LocalLLM, OpenAILLM, backend_from_spec
from lmcycle.errors import LmcycleError
from lmcycle.models.generate import DecodingConfig, generate
from lmcycle.models.load import load_pretrained

PROMPTS = ["the cat sees", "red green", "the dog sees the moon and"]


def test_local_backend_is_generate(tiny_model_dir):
    llm = LocalLLM(tiny_model_dir)
    assert isinstance(llm, LLM) and llm.context_window == 128
    model, tok = load_pretrained(tiny_model_dir)
    cfg = DecodingConfig(do_sample=True, temperature=1.3, seed=4, max_new_tokens=6)
    assert llm.complete(PROMPTS, cfg) == generate(model, tok, PROMPTS, cfg)
    assert llm.count_tokens("the cat sees") == len(tok("the cat sees")["input_ids"])


def test_continuation_logprobs_are_the_models_token_log_probs(tiny_model_dir):
    llm = LocalLLM(tiny_model_dir)
    tok = llm.tokenizer
    got = llm.continuation_logprobs("the cat", [" sees", " sees the dog"])
    for text, value in zip([" sees", " sees the dog"], got, strict=True):
        prompt, cont = tok("the cat")["input_ids"], tok(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + cont])
        with torch.no_grad():
            logp = llm.model(ids).logits.log_softmax(-1)[0]
        want = sum(logp[len(prompt) + i - 1, t].item() for i, t in enumerate(cont))
        assert value == pytest.approx(want, abs=1e-4)


def test_openai_backend_on_lmcycle_serve_equals_the_local_backend(tiny_model_dir):
    from lmcycle.serve.app import create_app

    local = LocalLLM(tiny_model_dir)
    with running(create_app(tiny_model_dir, api_key="k")) as url:
        remote = OpenAILLM(url + "/v1", "llama", api_key="k", context_window=128)
        for cfg in (DecodingConfig(max_new_tokens=6),
                    DecodingConfig(do_sample=True, temperature=1.2, top_k=20, seed=3, max_new_tokens=6),
                    DecodingConfig(max_new_tokens=8, stop=["e"])):
            assert remote.complete(PROMPTS, cfg) == local.complete(PROMPTS, cfg)
        chat = OpenAILLM(url + "/v1", "llama", api_key="k", chat=True)
        greedy = DecodingConfig(max_new_tokens=5)
        assert chat.complete(["hi there"], greedy) == local.complete(["user: hi there\nassistant:"], greedy)
    assert remote.count_tokens("x" * 30) == 10  # no tokenizer given: the documented over-estimate


def test_backend_specs():
    with pytest.raises(LmcycleError, match="use local:PATH or openai:BASE_URL#MODEL"):
        backend_from_spec("openai:http://x/v1")
    with pytest.raises(LmcycleError, match="use local:PATH"):
        backend_from_spec("vllm:foo")
    remote = backend_from_spec("openai:http://127.0.0.1:9/v1#m", api_key="k", context_window=512)
    assert isinstance(remote, OpenAILLM) and (remote.name, remote.context_window) == ("m", 512)
    with pytest.raises(LmcycleError, match="at most 4 stop strings"):
        remote.complete(["x"], DecodingConfig(stop=list("abcde")))
