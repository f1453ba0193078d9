"""Knowledge distillation: the loss against an independent computation, student initialisation, the distill stage
for a classifier (toy word task on a tiny BERT) and a decoder LM (tiny Llama), resume, and input errors. The toy
texts are harmless words."""

from __future__ import annotations

import json
import random

import pytest
import tiny_lm
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from lmcycle.artifacts import load_model
from lmcycle.config import validate
from lmcycle.data.examples import Example
from lmcycle.errors import LmcycleError
from lmcycle.models.classifier import TextClassifier
from lmcycle.optimize.distill import distillation_loss, hidden_state_loss
from lmcycle.optimize.student import (
    default_student_layers,
    param_count,
    student_from_scratch,
    student_from_teacher,
)
from lmcycle.stages.classifier import ClassifierStage, run_classifier
from lmcycle.stages.context import RunContext
from lmcycle.stages.distill import DistillStage, run_distill
from tests.evals.test_toxicity import BAD, GOOD, LABELS, NEUTRAL  # noqa: E402  (the toy words and labels)

LABEL_MAP = {"bad": "toxic", "good": "not_toxic"}


# -- the loss ------------------------------------------------------------------------------------------------------


def reference_loss(s, t, y, temperature, alpha, beta, keep):
    """Written out: KL(p_t || p_s) = sum p_t (log p_t - log p_s) at temperature T, times T^2, plus CE at T = 1."""
    s, t, y = s.reshape(-1, s.size(-1))[keep.reshape(-1)], t.reshape(-1, t.size(-1))[keep.reshape(-1)], y.reshape(-1)[keep.reshape(-1)]
    p_t = torch.softmax(t / temperature, dim=-1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / temperature, dim=-1))).sum()
    ce = -torch.log_softmax(s, dim=-1).gather(1, y[:, None]).sum()
    return alpha * temperature ** 2 * kl + beta * ce


@pytest.mark.parametrize("temperature,alpha,beta", [(1.0, 0.5, 0.5), (2.0, 0.7, 0.3), (4.0, 1.0, 0.0)])
def test_loss_equals_an_independent_computation_for_classes_and_tokens(temperature, alpha, beta):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g) * 2
    y = torch.tensor([0, 2, 1, 1, 0])
    loss, n = distillation_loss(s, t, y, temperature=temperature, alpha=alpha, beta=beta)
    assert n == 5
    assert float(loss) == pytest.approx(float(reference_loss(s, t, y, temperature, alpha, beta, y != -100)), rel=1e-5)

    s, t = torch.randn(2, 4, 11, generator=g), torch.randn(2, 4, 11, generator=g)
    y = torch.tensor([[3, -100, 5, 1], [-100, -100, 7, 0]])
    loss, n = distillation_loss(s, t, y, temperature=temperature, alpha=alpha, beta=beta)
    assert n == 5
    expected = reference_loss(s, t, y, temperature, alpha, beta, y != -100)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    # a mask counts only its positions (here: one labelled token less)
    mask = (y != -100) & torch.tensor([[True, True, True, False], [True, True, True, True]])
    loss, n = distillation_loss(s, t, y, temperature=temperature, alpha=alpha, beta=beta, mask=mask)
    assert n == 4 and float(loss) == pytest.approx(float(reference_loss(s, t, y, temperature, alpha, beta, mask)),
                                                   rel=1e-5)


def test_t_squared_keeps_the_soft_gradient_on_one_scale():
    g = torch.Generator().manual_seed(1)
    s0, t = torch.randn(64, 10, generator=g) * 0.1, torch.randn(64, 10, generator=g) * 0.1
    y = torch.zeros(64, dtype=torch.long)
    norms = {}
    for temperature in (2.0, 8.0):
        s = s0.clone().requires_grad_(True)
        loss, _ = distillation_loss(s, t, y, temperature=temperature, alpha=1.0, beta=0.0)
        loss.backward()
        norms[temperature] = float(s.grad.norm())
        # without T^2 the gradient is exactly T^2 times smaller
        s2 = s0.clone().requires_grad_(True)
        F.kl_div(torch.log_softmax(s2 / temperature, -1), torch.log_softmax(t / temperature, -1), log_target=True,
                 reduction="sum").backward()
        assert torch.allclose(s.grad, s2.grad * temperature ** 2, rtol=1e-4, atol=1e-7)
    # For logits small against T the soft gradient is ~(s - t) / N whatever T: the two agree within a few %.
    assert norms[8.0] == pytest.approx(norms[2.0], rel=0.05)


def test_hidden_state_loss_weights_positions_and_projects():
    g = torch.Generator().manual_seed(2)
    student = tuple(torch.randn(2, 3, 4, generator=g) for _ in range(3))
    teacher = tuple(torch.randn(2, 3, 4, generator=g) for _ in range(5))
    w = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    got = hidden_state_loss(student, teacher, {0: 1, 1: 3}, w)
    want = sum(((student[s + 1] - teacher[t + 1]) ** 2).mean(-1)[w > 0].sum() for s, t in [(0, 1), (1, 3)]) / 2
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    proj = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(4) * 2)
    doubled = hidden_state_loss(student, tuple(2 * x for x in teacher), {0: 1, 1: 3}, w, proj)
    assert float(doubled.detach()) == pytest.approx(4 * float(want), rel=1e-5)


# -- students ------------------------------------------------------------------------------------------------------


def tiny_bert(tokenizer, layers: int = 4, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, num_labels=2,
        id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, initializer_range=0.1))


def tiny_llama(tok, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        tie_word_embeddings=True))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_student_copies_exactly_the_chosen_layers(kind, word_tokenizer, tok):
    teacher = tiny_bert(word_tokenizer) if kind == "bert" else tiny_llama(tok, layers=4)
    prefix = "bert.encoder.layer" if kind == "bert" else "model.layers"
    student = student_from_teacher(teacher, [3, 1])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key, value in s_state.items():
        if key.startswith(prefix + "."):
            i, rest = key[len(prefix) + 1:].split(".", 1)
            source = t_state[f"{prefix}.{[3, 1][int(i)]}.{rest}"]
        else:
            source = t_state[key]
        assert torch.equal(value, source), key
    assert param_count(student) < param_count(teacher)

    ids = torch.tensor([[2, 5, 7, 9, 3], [2, 6, 8, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    whole = student_from_teacher(teacher, [0, 1, 2, 3])
    teacher.eval(), whole.eval()
    with torch.no_grad():
        assert torch.allclose(whole(input_ids=ids, attention_mask=mask).logits,
                              teacher(input_ids=ids, attention_mask=mask).logits, atol=1e-6)
    # and the student is a model of its own: training it leaves the teacher alone
    with torch.no_grad():
        next(iter(whole.parameters())).add_(1.0)
    assert not torch.equal(next(iter(whole.parameters())), next(iter(teacher.parameters())))


def test_student_from_scratch_and_layer_errors(word_tokenizer):
    teacher = tiny_bert(word_tokenizer)
    small = student_from_scratch(teacher, num_hidden_layers=1, hidden_size=16, intermediate_size=32)
    assert small.config.vocab_size == teacher.config.vocab_size and small.config.num_hidden_layers == 1
    assert param_count(small) < param_count(teacher) / 2
    assert default_student_layers(6) == [0, 2, 4]
    with pytest.raises(LmcycleError, match="out of range") as e:
        student_from_teacher(teacher, [0, 4])
    assert e.value.field == "student_layers"
    with pytest.raises(LmcycleError, match="repeats"):
        student_from_teacher(teacher, [1, 1])
    with pytest.raises(LmcycleError, match="vocabulary"):
        student_from_scratch(teacher, vocab_size=99)
    with pytest.raises(LmcycleError, match="no 'hidden_sise'"):
        student_from_scratch(teacher, hidden_sise=16)
    with pytest.raises(LmcycleError, match="cannot build the student"):
        student_from_scratch(teacher, hidden_size=15)  # not a multiple of the 2 heads


def test_t5_layers_are_refused(t5_tok):
    with pytest.raises(LmcycleError, match="encoder-decoder"):
        student_from_teacher(tiny_lm.tiny_t5(t5_tok), [0])


# -- the stage: classifier -----------------------------------------------------------------------------------------


JUNK = ["zebra", "quartz", "##ing", "##ed", "un", "##happy", "pyramid", "violin"]  # pieces the toy texts never use


def make_word_tokenizer():
    """BERT-style WordPiece: the toy words, some unused pieces, and every letter as a piece and a ##piece."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    letters = list(string.ascii_lowercase)
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *GOOD, *BAD, *NEUTRAL, *JUNK, *letters,
              *[f"##{c}" for c in letters]]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(dict.fromkeys(pieces))}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def word_tokenizer():
    return make_word_tokenizer()


def toy_examples(n: int, seed: int) -> list[Example]:
    """Texts of neutral words and one to three class words; the label is the class of those words."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.choice(["bad", "good"])
        words = [rng.choice(BAD if label == "bad" else GOOD) for _ in range(rng.randint(1, 3))]
        words += rng.sample(NEUTRAL, rng.randint(0, 5))
        rng.shuffle(words)
        out.append(Example(input=" ".join(words), targets=[label], id=f"{seed}-{i}"))
    return out


def classifier_ctx(tmp_path) -> RunContext:
    ctx = RunContext(run_dir=tmp_path / "run", recipe_file=str(tmp_path / "recipe.yaml"))
    ctx._datasets.update({"train": toy_examples(96, 1), "dev": toy_examples(40, 2)})
    return ctx


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, word_tokenizer):
    """A 4-layer tiny BERT classifier trained on the toy task by the classifier stage."""
    tmp = tmp_path_factory.mktemp("teacher")
    base = tmp / "base"
    tiny_bert(word_tokenizer).save_pretrained(base)
    word_tokenizer.save_pretrained(base)
    stage = validate(ClassifierStage, {"type": "classifier", "name": "clf", "model": str(base), "data": ["train"],
                                       "label_map": LABEL_MAP, "max_len": 16, "baseline": False,
                                       "train": {"max_steps": 40, "batch_size": 16, "lr": 3e-3, "log_every": 10}})
    return run_classifier(stage, classifier_ctx(tmp))["model"]


def distill_stage(teacher, **extra) -> DistillStage:
    train = {"max_steps": 40, "batch_size": 16, "lr": 3e-3, "log_every": 10}
    train.update(extra.pop("train", {}))
    return validate(DistillStage, {"type": "distill", "name": "kd", "teacher": str(teacher), "data": ["train"],
                                   "eval_data": ["dev"], "label_map": LABEL_MAP, "max_len": 16, "train": train,
                                   **extra})


def macro_f1(clf: TextClassifier, examples: list[Example]) -> float:
    from lmcycle.evals.classification import score_labels

    return score_labels(clf.predict([e.input for e in examples]), [LABEL_MAP[e.target] for e in examples])[
        "metrics"]["macro_f1"]


def test_classifier_student_learns_from_the_teacher(tmp_path, teacher_dir):
    ctx = classifier_ctx(tmp_path)
    teacher = TextClassifier.load(teacher_dir)
    before_teacher = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    teacher_f1 = macro_f1(teacher, ctx.dataset("dev"))
    assert teacher_f1 >= 90  # a teacher worth learning from

    config = {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32}
    cfg = distill_stage(teacher_dir, student_config=config, hidden_weight=0.1, train={"lr": 1e-2, "max_steps": 60})
    torch.manual_seed(cfg.train.seed or 0)
    untrained = TextClassifier(student_from_scratch(teacher.model, **config).eval(), teacher.tokenizer,
                               teacher.labels)
    produced = run_distill(cfg, ctx)
    student = TextClassifier.load(produced["model"])
    assert student.labels == teacher.labels and student.model.config.num_hidden_layers == 1
    student_f1 = macro_f1(student, ctx.dataset("dev"))
    assert student_f1 > macro_f1(untrained, ctx.dataset("dev")) and student_f1 >= 0.9 * teacher_f1

    report = json.loads(open(produced["eval"], encoding="utf-8").read())
    m = report["metrics"]
    assert m["dev.macro_f1"] == pytest.approx(student_f1) and m["teacher.dev.macro_f1"] == pytest.approx(teacher_f1)
    assert m["dev.macro_f1_ratio"] == pytest.approx(student_f1 / teacher_f1)
    assert m["student_params"] == param_count(student.model) and m["teacher_params"] == param_count(teacher.model)
    assert m["param_ratio"] == pytest.approx(m["student_params"] / m["teacher_params"]) and m["param_ratio"] < 0.5
    assert report["settings"]["temperature"] == 2.0 and report["settings"]["task"] == "classifier"
    # the teacher never changes, on disk or in memory
    reloaded = TextClassifier.load(teacher_dir).model.state_dict()
    assert all(torch.equal(before_teacher[k], reloaded[k]) for k in before_teacher)
    # its logits were computed once and cached in the stage folder
    assert (tmp_path / "run" / "kd" / "teacher_logits.safetensors").is_file()
    # the projection (student width 16 -> teacher 32) trained with the student: in the checkpoint, not the model
    from safetensors import safe_open
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(tmp_path / "run" / "kd" / "checkpoints" / "step-60").read_metadata()
    assert "model.projection.weight" in saved.state_dict_metadata
    with safe_open(str(tmp_path / "run" / "kd" / "model" / "model.safetensors"), "pt") as f:
        assert not any("projection" in k for k in f.keys())


def test_resume_after_a_crash_gives_identical_weights(tmp_path, teacher_dir, monkeypatch):
    import lmcycle.stages.distill as distill  # the stage's loss_fn calls distillation_loss

    train = {"max_steps": 6, "batch_size": 8, "save_every": 3, "log_every": 1}
    cfg = distill_stage(teacher_dir, student_layers=[1, 3], hidden_weight=0.5, train=train)
    straight = load_model_weights(run_distill(cfg, classifier_ctx(tmp_path / "a"))["model"])

    calls = {"n": 0}
    real_loss = distill.distillation_loss

    def crash_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # killed while training step 5 (one micro-batch per step)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(distill, "distillation_loss", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_distill(cfg, classifier_ctx(tmp_path / "b"))
    monkeypatch.setattr(distill, "distillation_loss", real_loss)
    stage_dir = tmp_path / "b" / "run" / "kd"
    assert [p.name for p in (stage_dir / "checkpoints").iterdir()] == ["step-3"]
    cache = (stage_dir / "teacher_logits.safetensors").stat().st_mtime_ns
    resumed = load_model_weights(run_distill(cfg, classifier_ctx(tmp_path / "b"))["model"])
    assert (stage_dir / "teacher_logits.safetensors").stat().st_mtime_ns == cache  # reused, not recomputed
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def load_model_weights(path) -> dict[str, torch.Tensor]:
    return TextClassifier.load(path).model.state_dict()


def test_bad_settings_are_errors_naming_the_field(tmp_path, teacher_dir, tok):
    ctx = classifier_ctx(tmp_path)
    cases = [
        (dict(alpha=0.0, beta=0.0), "alpha"),
        (dict(student_layers=[0, 9]), "student_layers"),
        (dict(student_layers=[2, 2]), "student_layers"),
        (dict(student_layers=[0], student_config={"num_hidden_layers": 1}), "student_config"),
        (dict(student_config={"vocab_size": 7}), "student_config.vocab_size"),
        (dict(label_map={"bad": "toxic", "good": "clean"}), "label_map"),
        (dict(task="lm"), "teacher"),
    ]
    for extra, field in cases:
        with pytest.raises(LmcycleError) as e:
            run_distill(distill_stage(teacher_dir, **extra), ctx)
        assert e.value.field == field and e.value.file, (extra, str(e.value))
    with pytest.raises(LmcycleError, match="greater than 0") as e:
        distill_stage(teacher_dir, temperature=0)
    assert e.value.field == "temperature"
    lm_dir = tiny_lm.save_tiny(tiny_llama(tok), tok, tmp_path / "lm")
    with pytest.raises(LmcycleError, match="not a sequence classifier") as e:
        run_distill(distill_stage(lm_dir, task="classifier"), ctx)
    assert e.value.field == "teacher"


# -- the stage: LM -------------------------------------------------------------------------------------------------


def test_lm_student_dev_loss_falls_and_teacher_is_untouched(tmp_path, tok):
    teacher_model = tiny_llama(tok, layers=2)
    ctx = tiny_lm.run_context(tmp_path, teacher_model, tok)
    teacher_before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    cfg = validate(DistillStage, {"type": "distill", "name": "kd", "teacher": "build", "data": ["reverse"],
                                  "eval_data": ["dev"], "template": "summarize", "max_len": 64, "hidden_weight": 0.1,
                                  "student_layers": [1],
                                  "train": {"max_steps": 12, "batch_size": 8, "lr": 3e-3, "log_every": 4,
                                            "eval_every": 6}})
    produced = run_distill(cfg, ctx)
    student, _ = load_model(produced["model"])
    assert student.config.num_hidden_layers == 1
    report = json.loads(open(produced["eval"], encoding="utf-8").read())
    assert report["settings"]["task"] == "lm" and report["settings"]["layer_map"] == {"0": 1}
    dev = [m["eval_loss"] for m in ctx.read_metrics("kd") if "eval_loss" in m]
    assert len(dev) == 2 and dev[1] < dev[0]
    assert report["metrics"]["dev.loss"] == pytest.approx(dev[-1], rel=1e-5)
    assert report["metrics"]["teacher.dev.perplexity"] > 1 and report["metrics"]["param_ratio"] < 1
    teacher_after, _ = load_model(ctx.model_path("build"))
    assert all(torch.equal(teacher_before[k], teacher_after.state_dict()[k]) for k in teacher_before)


# -- vocabulary trimming -------------------------------------------------------------------------------------------


def test_trimmed_tokenizer_keeps_used_pieces_and_spells_out_the_rest(tmp_path, word_tokenizer):
    from transformers import AutoTokenizer

    from lmcycle.optimize.student import trim_vocabulary

    texts = [e.input for e in toy_examples(40, 5)]
    encoded = [word_tokenizer(t)["input_ids"] for t in texts]
    trimmed, kept = trim_vocabulary(word_tokenizer, {i for ids in encoded for i in ids})
    vocab = word_tokenizer.get_vocab()
    assert all(vocab[w] not in kept for w in ["zebra", "quartz", "pyramid", "##happy"])
    assert vocab["z"] in kept and vocab["##q"] in kept and vocab["[MASK]"] in kept
    trimmed.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for tokenizer in (trimmed, reloaded):
        assert len(tokenizer) == len(kept) < len(word_tokenizer)
        for text, ids in zip(texts, encoded, strict=True):  # same pieces, renumbered
            assert tokenizer(text)["input_ids"] == [kept.index(i) for i in ids]
        spelled = tokenizer.convert_ids_to_tokens(tokenizer("zebra cat")["input_ids"])
        assert spelled == ["[CLS]", "z", "##e", "##b", "##r", "##a", "cat", "[SEP]"]  # no [UNK]
        assert tokenizer.pad_token_id == kept.index(word_tokenizer.pad_token_id)


def test_trim_vocab_stage_shrinks_the_student_and_keeps_its_predictions(tmp_path, teacher_dir):
    ctx = classifier_ctx(tmp_path)
    cfg = distill_stage(teacher_dir, trim_vocab=True, hidden_weight=0.1)  # default layers: every other one
    produced = run_distill(cfg, ctx)
    report = json.loads(open(produced["eval"], encoding="utf-8").read())
    untrimmed = run_distill(distill_stage(teacher_dir, name="plain", hidden_weight=0.1), ctx)
    plain = json.loads(open(untrimmed["eval"], encoding="utf-8").read())

    student = TextClassifier.load(produced["model"])
    teacher = TextClassifier.load(teacher_dir)
    assert student.model.config.vocab_size == len(student.tokenizer) < teacher.model.config.vocab_size
    assert report["metrics"]["student_params"] < plain["metrics"]["student_params"]
    # the reloaded student (its saved, trimmed tokenizer included) scores what the stage reported
    assert macro_f1(student, ctx.dataset("dev")) == pytest.approx(report["metrics"]["dev.macro_f1"])
    assert report["metrics"]["dev.macro_f1"] >= 0.9 * report["metrics"]["teacher.dev.macro_f1"]
    # same data, same ids (renumbered): trimming alone changes nothing the student computes
    assert report["metrics"]["dev.macro_f1"] == pytest.approx(plain["metrics"]["dev.macro_f1"])
    assert plain["settings"]["student_vocab_size"] == teacher.model.config.vocab_size
    assert report["settings"]["student_layers"] == [0, 2] and report["settings"]["layer_map"] == {"0": 0, "1": 2}


def test_plain_text_lm_items_score_every_token(tok):
    from lmcycle.optimize.distill import lm_items

    exs = [Example(input="the cat sat", targets=["on the mat"]), Example(input="a dog", targets=[])]
    items = lm_items(exs, tok, None, max_len=64)
    assert [tok.decode(it["input_ids"]) for it in items] == ["the cat sat", "on the mat", "a dog"]
    assert all(it["labels"] == it["input_ids"] for it in items)
    assert all(len(it["input_ids"]) <= 3 for it in lm_items(exs, tok, None, max_len=3))
