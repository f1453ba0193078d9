"""Log-probs from ``lmcycle serve`` through the official ``openai`` client: chat and completions (echo, scoring
only), equal to what the same model computes in-process; and OpenAILLM.continuation_logprobs built on them."""

from __future__ import annotations

from types import SimpleNamespace

import openai
import pytest
import torch
from loopback import running
from tiny_lm import make_tokenizer, save_tiny, tiny_llama

from lmcycle.adapt.lora import LoraConfig, add_lora, lora_layers, save_lora
from lmcycle.apps.llm import LocalLLM, OpenAILLM
from lmcycle.artifacts import load_adapted, load_model
from lmcycle.errors import LmcycleError
from lmcycle.models.generate import DecodingConfig, generate_ids
from lmcycle.serve.app import create_app


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("logprobs")
    tok = make_tokenizer()
    base = save_tiny(tiny_llama(tok), tok, root / "base")
    model, _ = load_model(base)
    add_lora(model, LoraConfig(r=4, alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(0, 2.0)  # the adapter changes the log-probs
    adapter = str(save_lora(model, "default", root / "ad1", base_model_name_or_path=base))
    app = create_app(base, {"ad1": adapter}, batch_wait_s=0.01)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        yield {"url": url, "client": client, "base": base, "adapter": adapter}


def _log_softmax(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, V]: row t is the distribution of token t + 1 given tokens 0..t."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


def test_chat_logprobs_are_the_models_raw_log_softmax_and_top_0_is_the_greedy_token(served):
    r = served["client"].chat.completions.create(model="base", messages=[{"role": "user", "content": "the cat"}],
                                                 max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens > 0
    assert "".join(t.token for t in content) == r.choices[0].message.content
    model, tok = load_model(served["base"])
    prompt = "user: the cat\nassistant:"
    new = generate_ids(model, tok, [prompt], DecodingConfig(max_new_tokens=6))[0]
    prompt_ids = tok(prompt)["input_ids"]
    logp = _log_softmax(model, prompt_ids + new)[len(prompt_ids) - 1:]
    for t, (token, row) in enumerate(zip(new, logp, strict=True)):
        got = content[t]
        assert got.bytes == list(got.token.encode("utf-8"))
        assert [a.logprob for a in got.top_logprobs] == sorted((a.logprob for a in got.top_logprobs), reverse=True)
        assert len(got.top_logprobs) == 3
        assert got.top_logprobs[0].token == got.token and got.top_logprobs[0].logprob == got.logprob  # greedy
        assert got.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert [a.logprob for a in got.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    plain = served["client"].chat.completions.create(model="base", messages=[{"role": "user", "content": "the cat"}],
                                                     max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_completion_echo_scores_the_prompt_and_the_backends_agree(served):
    prompt = "the cat sees"
    r = served["client"].completions.create(model="base", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0
    assert "".join(lp.tokens) == prompt and len(lp.tokens) == r.usage.prompt_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) in (2, 3) and top[tok] == value  # the 2 best and the chosen token
               for tok, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True))
    continuations = [" the dog", " red green"]
    for name, local in (("base", LocalLLM(served["base"])),
                        ("ad1", LocalLLM(*load_adapted(served["adapter"], served["base"])))):
        want = local.continuation_logprobs(prompt, continuations)
        got = OpenAILLM(served["url"] + "/v1", name).continuation_logprobs(prompt, continuations)
        assert got == pytest.approx(want, abs=1e-4), name
        assert abs(want[0] - want[1]) > 1e-3  # the two continuations really score differently


def test_generated_tokens_get_logprobs_after_an_echoed_prompt(served):
    kw = dict(model="ad1", prompt="red green", max_tokens=4, temperature=0)
    plain = served["client"].completions.create(**kw).choices[0]
    r = served["client"].completions.create(**kw, echo=True, logprobs=1).choices[0]
    assert r.text == "red green" + plain.text
    lp = r.logprobs
    assert "".join(lp.tokens).startswith("red green") and lp.token_logprobs[0] is None
    assert all(value is not None and value <= 0 for value in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)


@pytest.mark.parametrize("path, body, param", [
    ("/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ("/chat/completions", {"logprobs": True, "stream": True}, "logprobs"),
    ("/completions", {"logprobs": 6}, "logprobs"),
    ("/completions", {"logprobs": True}, "logprobs"),  # an int, not a bool
    ("/completions", {"max_tokens": 0}, "max_tokens"),  # generates nothing: only with echo
    ("/completions", {"echo": True, "stream": True}, "echo"),
])
def test_bad_logprob_settings_get_400(served, path, body, param):
    base = {"model": "base", "max_tokens": 2}
    base |= {"messages": [{"role": "user", "content": "hi"}]} if path.startswith("/chat") else {"prompt": "the"}
    with pytest.raises(openai.BadRequestError) as e:
        served["client"].post(path, body=base | body, cast_to=object)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_continuation_logprobs_without_server_logprobs_raises_a_backend_error(served):
    llm = OpenAILLM(served["url"] + "/v1", "base")
    choice = SimpleNamespace(index=0, text="x", logprobs=None)
    llm.client = SimpleNamespace(completions=SimpleNamespace(create=lambda **_: SimpleNamespace(choices=[choice])))
    with pytest.raises(LmcycleError) as e:
        llm.continuation_logprobs("the", [" cat"])
    assert e.value.field == "backend" and "log-probs" in str(e.value)


def test_ai_feedback_through_the_endpoint_equals_the_in_process_judgement(tmp_path):
    """The feedback model as an endpoint (`feedback_model: openai:URL#MODEL`): the same soft label, both orders."""
    from lmcycle.align.ai_feedback import judge
    from lmcycle.align.constitution import Constitution, CritiquePrinciple

    c = Constitution(critiques=(CritiquePrinciple("p", "\n\nCritiqueRequest: x\n\nCritique:",
                                                  "\n\nRevisionRequest: y\n\nRevision:"),),
                     comparisons=("\nPlease choose the kinder response. Options:",))
    tok = make_tokenizer()
    model = tiny_llama(tok)
    model.config.max_position_embeddings = 1024  # room for the feedback prompt (rotary: only the limit changes)
    base = save_tiny(model, tok, tmp_path / "wide")
    with running(create_app(base, {}, batch_wait_s=0.01)) as url:
        remote = judge(OpenAILLM(url + "/v1", "wide"), c, "the cat", "a dog", "the mat", c.comparisons[0])
    b = judge(LocalLLM(base), c, "the cat", "a dog", "the mat", c.comparisons[0])
    a = remote
    assert a.scoring == b.scoring == "likelihood"
    assert (a.p_a_forward, a.p_a_swapped, a.p_first) == pytest.approx((b.p_a_forward, b.p_a_swapped, b.p_first),
                                                                      abs=1e-4)
