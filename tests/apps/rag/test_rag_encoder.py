import numpy as np
import pytest
import torch

from lmcycle.apps.rag.encoder import Encoder, pool
from lmcycle.errors import LmcycleError

TEXTS = ["A man is playing a guitar on stage.", "Someone performs music with a guitar."]


def test_minilm_is_mean_pooled_and_normalised_like_sentence_transformers(minilm_encoder):
    assert (minilm_encoder.pooling, minilm_encoder.normalize, minilm_encoder.max_length) == ("mean", True, 256)
    tok, model = minilm_encoder.tokenizer, minilm_encoder.model
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    manual = []
    for i in range(len(TEXTS)):
        n = int(batch["attention_mask"][i].sum())
        mean = hidden[i, :n].mean(0)  # the real tokens only (padding sits at the end)
        manual.append((mean / mean.norm()).numpy())
    got = minilm_encoder.encode(TEXTS)
    assert got.dtype == np.float32 and got.shape == (2, 384)
    np.testing.assert_allclose(got, np.stack(manual), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # a row does not depend on its batch-mates (padding is masked out)
    np.testing.assert_allclose(minilm_encoder.encode(TEXTS[1:]), got[1:], atol=1e-5)


def test_similar_sentences_score_higher_than_unrelated(minilm_encoder):
    q = minilm_encoder.encode_queries(["How do I bake bread at home?"])
    p = minilm_encoder.encode_passages(["Homemade bread: mix flour, water, yeast and bake it in the oven.",
                                        "The stock market fell sharply on Monday."])
    scores = (p @ q.T).ravel()
    assert scores[0] > scores[1] + 0.2


def test_pool_modes_and_load_error():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask).tolist() == [[2.0, 3.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]
    with pytest.raises(LmcycleError, match="cannot load encoder"):
        Encoder("/nonexistent/encoder-folder")
