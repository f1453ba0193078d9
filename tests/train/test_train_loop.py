import copy
import functools
import re
from pathlib import Path

import pytest
import tiny_lm
import torch

import lmcycle.train.loop as loop
from lmcycle.data.sft import collate_sft, encode_sft
from lmcycle.data.templates import get_template
from lmcycle.errors import LmcycleError
from lmcycle.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from lmcycle.train.engines import LocalEngine
from lmcycle.train.loop import (
    TrainConfig,
    clip_gradients,
    compute_gradients,
    lm_loss_sum,
    make_optimizer,
    micro_batch_indices,
    train,
)


@pytest.fixture(scope="module")
def items(tok):
    """SFT items of different lengths, so micro-batches hold different numbers of loss tokens."""
    return encode_sft(tiny_lm.examples(32, seed=2), get_template("summarize"), tok, max_len=64, seq2seq=False)


def sft_batches(items, cfg: TrainConfig, seed: int = 0):
    def batch_at(step):
        return [collate_sft([items[i] for i in idx], 0)
                for idx in micro_batch_indices(len(items), step, cfg.batch_size, cfg.grad_accum, seed)]
    return batch_at


def no_log(**_):
    pass


def test_gradient_accumulation_gives_the_gradient_of_one_big_batch(tok, items):
    model = tiny_lm.tiny_llama(tok)
    twin = copy.deepcopy(model)
    eight = items[:8]
    halves = [collate_sft(eight[:4], 0), collate_sft(eight[4:], 0)]
    counts = [int((h["labels"][:, 1:] != -100).sum()) for h in halves]
    assert counts[0] != counts[1]  # a mean of per-micro-batch means would be wrong here

    loss_a, n_a = compute_gradients(LocalEngine(model, list(model.parameters())), halves, lm_loss_sum)
    loss_b, n_b = compute_gradients(LocalEngine(twin, list(twin.parameters())), [collate_sft(eight, 0)], lm_loss_sum)
    assert n_a == n_b == sum(counts)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=0), name


def test_training_with_accumulation_matches_training_with_the_big_batch(tok, items, tmp_path):
    runs = []
    for batch_size, accum in [(4, 2), (8, 1)]:
        model = tiny_lm.tiny_llama(tok)
        cfg = TrainConfig(max_steps=3, batch_size=batch_size, grad_accum=accum, lr=1e-2, seed=0)
        result = train(model, sft_batches(items, cfg), lm_loss_sum, cfg, tmp_path / f"{batch_size}", no_log)
        runs.append((result.losses, model.state_dict()))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-5)
    for k, v in runs[0][1].items():
        assert torch.allclose(v, runs[1][1][k], atol=1e-5), k


class Interrupted(Exception):
    pass


def test_a_resumed_run_repeats_the_uninterrupted_one_bit_for_bit(tok, items, tmp_path):
    # Dropout is on: the checkpoint must restore the random state too, not only weights and optimizer.
    cfg = TrainConfig(max_steps=6, batch_size=4, lr=5e-3, warmup_steps=2, seed=3, save_every=2)
    straight_model = tiny_lm.tiny_gpt2(tok, dropout=0.1)
    straight = train(straight_model, sft_batches(items, cfg), lm_loss_sum, cfg, tmp_path / "straight", no_log)

    def killed_at_step_2(step):
        if step == 2:
            raise Interrupted
        return sft_batches(items, cfg)(step)

    with pytest.raises(Interrupted):
        train(tiny_lm.tiny_gpt2(tok, dropout=0.1), killed_at_step_2, lm_loss_sum, cfg, tmp_path / "resumed",
              no_log)
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed")] == [2]

    resumed_model = tiny_lm.tiny_gpt2(tok, seed=123, dropout=0.1)  # different init: the checkpoint must win
    resumed = train(resumed_model, sft_batches(items, cfg), lm_loss_sum, cfg, tmp_path / "resumed", no_log)
    assert resumed.step == 6
    assert resumed.losses == straight.losses  # exact equality, all 6 steps
    for k, v in straight_model.state_dict().items():
        assert torch.equal(v, resumed_model.state_dict()[k]), k


def test_a_finished_run_is_not_trained_again(tok, items, tmp_path):
    cfg = TrainConfig(max_steps=2, batch_size=4, seed=0)
    model = tiny_lm.tiny_llama(tok)
    first = train(model, sft_batches(items, cfg), lm_loss_sum, cfg, tmp_path, no_log)
    calls = []
    fresh = tiny_lm.tiny_llama(tok, seed=9)
    again = train(fresh, lambda s: calls.append(s), lm_loss_sum, cfg, tmp_path, no_log)
    assert calls == [] and again.losses == first.losses and again.step == 2
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_diverging_run_raises_and_leaves_the_last_good_checkpoint(tok, items, tmp_path):
    cfg = TrainConfig(max_steps=6, batch_size=4, lr=1e30, max_grad_norm=None, save_every=1, seed=0)
    with pytest.raises(LmcycleError, match=r"diverged at step \d+.*learning rate") as err:
        train(tiny_lm.tiny_llama(tok), sft_batches(items, cfg), lm_loss_sum, cfg, tmp_path, no_log)
    failed_step = int(re.search(r"step (\d+)", str(err.value)).group(1))
    assert latest_checkpoint(tmp_path).name == f"step-{failed_step - 1}"  # nothing saved for the bad step
    fresh = tiny_lm.tiny_llama(tok, seed=5)
    state = load_checkpoint(latest_checkpoint(tmp_path), fresh, make_optimizer(list(fresh.parameters()), cfg))
    assert state["step"] == failed_step - 1
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_a_nan_loss_stops_before_the_weights_change(tok, items, tmp_path):
    cfg = TrainConfig(max_steps=6, batch_size=4, lr=1e-2, save_every=1, seed=0)
    good = sft_batches(items, cfg)

    def poisoned(step):
        return [{**b, "poison": torch.tensor(step == 3)} for b in good(step)]

    def loss_fn(model, batch):
        loss, n = lm_loss_sum(model, batch)
        return (loss * float("nan") if batch["poison"] else loss), n

    model = tiny_lm.tiny_llama(tok)
    with pytest.raises(LmcycleError, match="diverged at step 4"):
        train(model, poisoned, loss_fn, cfg, tmp_path / "nan", no_log)
    def stop_at_step_3(step):
        if step == 3:
            raise Interrupted
        return good(step)

    reference = tiny_lm.tiny_llama(tok)  # the same run, stopped cleanly after 3 steps
    with pytest.raises(Interrupted):
        train(reference, stop_at_step_3, lm_loss_sum, cfg, tmp_path / "ref", no_log)
    # The failed step touched neither the live model nor the newest checkpoint (step-3).
    restored = tiny_lm.tiny_llama(tok, seed=5)
    load_checkpoint(latest_checkpoint(tmp_path / "nan"), restored)
    for k, v in reference.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
        assert torch.equal(v, restored.state_dict()[k]), k


def test_only_the_newest_checkpoints_are_kept(tok, items, tmp_path):
    cfg = TrainConfig(max_steps=5, batch_size=2, save_every=1, keep_checkpoints=2, seed=0)
    train(tiny_lm.tiny_llama(tok), sft_batches(items, cfg), lm_loss_sum, cfg, tmp_path, no_log)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    files = {p.name for p in latest_checkpoint(tmp_path).iterdir()}
    assert files == {".metadata", "__0_0.distcp", "rng.pt", "state.json"}  # DCP: one shard file per rank
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_logging_and_eval_happen_at_their_cadence(tok, items, tmp_path):
    cfg = TrainConfig(max_steps=7, batch_size=2, log_every=2, eval_every=3, seed=0)
    logged, evals = [], []

    def eval_fn(model):
        evals.append(model.training)
        return {"eval_loss": 1.5}

    model = tiny_lm.tiny_llama(tok)
    result = train(model, sft_batches(items, cfg), lm_loss_sum, cfg, tmp_path, lambda **m: logged.append(m),
                   eval_fn=eval_fn)
    train_logs = [m for m in logged if "loss" in m]
    assert [m["step"] for m in train_logs] == [2, 4, 6, 7]
    assert set(train_logs[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s"}
    assert train_logs[0]["loss"] == pytest.approx(sum(result.losses[:2]) / 2)  # mean since the last log
    assert [m["step"] for m in logged if "eval_loss" in m] == [3, 6, 7]
    assert evals == [False, False, False] and model.training  # eval mode inside eval_fn only
    assert result.eval == {"eval_loss": 1.5}
    assert result.tokens_per_s > 0 and result.peak_rss_mb > 0


def test_weight_decay_skips_biases_and_norm_gains(tok):
    model = tiny_lm.tiny_gpt2(tok)
    opt = make_optimizer(list(model.parameters()), TrainConfig(max_steps=1, weight_decay=0.1))
    for group in opt.param_groups:
        assert all((p.ndim >= 2) == (group["weight_decay"] == 0.1) for p in group["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_clipping_bounds_the_norm_and_reports_it_unclipped(tok, items):
    model = tiny_lm.tiny_llama(tok)
    params = list(model.parameters())
    compute_gradients(LocalEngine(model, params), [collate_sft(items[:4], 0)], lm_loss_sum)
    norm = clip_gradients(params, 1e-3)
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert norm > 1e-3 and after.item() == pytest.approx(1e-3, rel=1e-4)


def test_every_epoch_visits_each_item_once():
    seen = [i for step in range(5) for mb in micro_batch_indices(10, step, 2, 1, seed=0) for i in mb]
    assert sorted(seen) == list(range(10))
    next_epoch = [i for step in range(5, 10) for mb in micro_batch_indices(10, step, 2, 1, seed=0) for i in mb]
    assert sorted(next_epoch) == list(range(10)) and next_epoch != seen


def test_a_step_sees_the_same_items_however_it_is_split(monkeypatch):
    whole = micro_batch_indices(50, 3, 8, 1, seed=1)
    accum = micro_batch_indices(50, 3, 4, 2, seed=1)
    assert [i for mb in accum for i in mb] == whole[0]
    monkeypatch.setattr(loop, "world_size", lambda: 2)
    per_rank = []
    for r in (0, 1):
        monkeypatch.setattr(loop, "rank", lambda r=r: r)
        per_rank.append(micro_batch_indices(50, 3, 2, 2, seed=1))
    assert sorted(i for mbs in per_rank for mb in mbs for i in mb) == sorted(whole[0])


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_lm_loss_sum_agrees_with_the_models_own_mean_loss(arch, tok, t5_tok):
    seq2seq = arch == "t5"
    tokenizer = t5_tok if seq2seq else tok
    model = tiny_lm.tiny_t5(tokenizer) if seq2seq else tiny_lm.tiny_llama(tokenizer)
    items = encode_sft(tiny_lm.examples(6, seed=4), get_template("summarize"), tokenizer, 64, seq2seq)
    batch = collate_sft(items, tokenizer.pad_token_id)
    loss_sum, n = lm_loss_sum(model, batch)
    assert (loss_sum / n).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)


def test_bf16_autocast_trains_with_a_loss_close_to_fp32(tok, items, tmp_path):
    results = []
    for bf16 in (False, True):
        cfg = TrainConfig(max_steps=2, batch_size=4, seed=0, bf16=bf16)
        results.append(train(tiny_lm.tiny_llama(tok), sft_batches(items, cfg), lm_loss_sum, cfg,
                             tmp_path / str(bf16), no_log).losses)
    fp32, bf16 = results
    assert fp32[0] != bf16[0]  # autocast really ran in lower precision
    assert bf16 == pytest.approx(fp32, abs=0.05)


def test_a_checkpoint_of_another_model_is_a_clear_error(tok, items, tmp_path):
    cfg = TrainConfig(max_steps=1, batch_size=2, seed=0)
    train(tiny_lm.tiny_llama(tok), sft_batches(items, cfg), lm_loss_sum, cfg, tmp_path, no_log)
    with pytest.raises(LmcycleError, match="cannot resume from this checkpoint"):
        train(tiny_lm.tiny_gpt2(tok), sft_batches(items, cfg), lm_loss_sum, cfg, tmp_path, no_log)


def test_without_eval_every_the_model_is_evaluated_once_at_the_end(tok, items, tmp_path):
    cfg = TrainConfig(max_steps=3, batch_size=2, seed=0)
    logged = []
    train(tiny_lm.tiny_llama(tok), sft_batches(items, cfg), lm_loss_sum, cfg, tmp_path,
          lambda **m: logged.append(m), eval_fn=lambda m: {"eval_loss": 2.0})
    assert [m["step"] for m in logged if "eval_loss" in m] == [3]


def test_peak_memory_window_restarts_so_each_stage_reports_its_own_peak():
    import os

    from lmcycle.train.loop import peak_rss_mb, reset_peak_rss

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip(reason="needs Linux /proc/self/clear_refs to reset the peak-RSS counter")
    big = torch.ones(100_000_000, dtype=torch.uint8) + 1  # ~100 MB touched, then released
    del big
    with_big = peak_rss_mb()
    reset_peak_rss()
    assert peak_rss_mb() < with_big - 50


@pytest.mark.parametrize("arch", ["llama", "gpt2", "prompt_tuned"])
def test_sft_loss_skips_the_lm_head_at_unscored_positions_without_changing_loss_or_gradients(arch, tok):
    import torch.nn.functional as F

    from lmcycle.adapt.prompt_tuning import PromptTuningConfig, add_prompt_tuning

    model = tiny_lm.tiny_gpt2(tok) if arch == "gpt2" else tiny_lm.tiny_llama(tok)
    if arch == "prompt_tuned":
        model = add_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=3))
    items = encode_sft(tiny_lm.examples(4, seed=5), get_template("summarize"), tok, 64, False)
    batch = collate_sft(items, tok.pad_token_id)
    assert (batch["labels"] == -100).all(0).any()  # the prompts' positions: no row is scored there

    loss, n = loop.lm_loss_sum(model, batch)
    loss.backward()
    fast = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # The reference: logits at every position, labels shifted, the same summed cross-entropy.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    full = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
    full.backward()
    assert n == int((labels != -100).sum()) and torch.allclose(loss, full, rtol=1e-5)
    for k, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(fast[k], p.grad, atol=1e-5), k


# -- divergence: the loss-spike guard ----------------------------------------------------------------------------


def climbing_after(start: int, items):
    """One fixed batch (memorised, so its loss falls every step) whose loss doubles each step from ``start`` on:
    a run that diverges gradually, finite all along."""
    batch = collate_sft(items[:4], 0)

    def batch_at(step):
        return [{**batch, "scale": torch.tensor(2.0 ** max(0, step - start + 1))}]

    def loss_fn(model, b):
        loss, n = lm_loss_sum(model, {k: v for k, v in b.items() if k != "scale"})
        return loss * b["scale"], n

    return batch_at, loss_fn


def test_a_loss_spike_stops_the_run_and_keeps_the_checkpoint_from_before_it(tok, items, tmp_path):
    cfg = TrainConfig(max_steps=30, batch_size=4, lr=1e-2, save_every=1, keep_checkpoints=2, spike_window=5, seed=0)
    batch_at, loss_fn = climbing_after(8, items)
    # It climbs from step 9 and is over 4× its median from step 11: three such steps (spike_patience) stop it.
    with pytest.raises(LmcycleError, match=r"diverged at step 13: loss \S+ is \d+× the median") as err:
        train(tiny_lm.tiny_llama(tok), batch_at, loss_fn, cfg, tmp_path, no_log)
    message = str(err.value)
    assert "began to rise at step 9" in message
    # The advice is worded from the settings: clipping is on already, so it is not suggested.
    assert "lr 0.01 with 0 warmup steps and max_grad_norm 1:" in message and "set max_grad_norm" not in message
    # step-9 .. step-12 were written after the rise began: the two newest set aside, and none evicted step-8.
    assert [s for s, _ in list_checkpoints(tmp_path)] == [8]
    assert f"the last good checkpoint is {tmp_path / 'checkpoints' / 'step-8'}" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("diverged-*")) == ["diverged-step-11",
                                                                                      "diverged-step-12"]
    state = load_checkpoint(latest_checkpoint(tmp_path), tiny_lm.tiny_llama(tok, seed=5))
    assert state["step"] == 8 and state["losses"] == sorted(state["losses"], reverse=True)  # before the climb


def test_the_spike_check_can_be_turned_off_and_suggests_clipping_only_when_it_is_off(tok, items, tmp_path):
    batch_at, loss_fn = climbing_after(8, items)
    cfg = TrainConfig(max_steps=16, batch_size=4, lr=1e-2, spike_window=5, spike_factor=None, seed=0)
    assert train(tiny_lm.tiny_llama(tok), batch_at, loss_fn, cfg, tmp_path / "off", no_log).step == 16
    cfg = cfg.model_copy(update={"spike_factor": 4.0, "max_grad_norm": None})
    with pytest.raises(LmcycleError, match=r"no gradient clipping: .* or set max_grad_norm"):
        train(tiny_lm.tiny_llama(tok), batch_at, loss_fn, cfg, tmp_path / "on", no_log)


def test_a_small_loss_that_quadruples_is_not_a_spike(tmp_path):
    cfg = TrainConfig(max_steps=30, spike_window=5, spike_patience=1)
    loop.check_spike(5, 0.4, [0.05] * 5, cfg, tmp_path)  # 8× the median, but only 0.35 nats above it
    with pytest.raises(LmcycleError, match="diverged at step 6"):
        loop.check_spike(5, 4.0, [0.9] * 5, cfg, tmp_path)


def test_one_outlier_batch_is_not_a_spike_but_a_lasting_climb_is(tmp_path):
    cfg = TrainConfig(max_steps=30, spike_window=5)  # spike_patience 3
    normal = [0.3] * 5
    loop.check_spike(5, 3.0, normal, cfg, tmp_path)  # a reward model's bad batch: 10× the median, once
    loop.check_spike(7, 0.3, [*normal, 3.0, 0.3], cfg, tmp_path)
    loop.check_spike(7, 3.0, [*normal, 3.0, 0.3], cfg, tmp_path)  # two high steps of three: not yet
    with pytest.raises(LmcycleError, match="diverged at step 8: .* for 3 steps"):
        loop.check_spike(7, 3.0, [*normal, 2.5, 2.8], cfg, tmp_path)


# -- resuming ---------------------------------------------------------------------------------------------------


def killed_at(step_to_die: int, batch_at):
    def batch_at_or_die(step):
        if step == step_to_die:
            raise Interrupted
        return batch_at(step)
    return batch_at_or_die


@pytest.mark.parametrize("save_every", [2, 0], ids=["from-step-2", "no-checkpoint-yet"])
def test_a_resumed_run_logs_each_step_once_and_the_report_counts_them_once(save_every, tok, items, tmp_path):
    from lmcycle.report import write_report
    from lmcycle.stages import report_sections
    from lmcycle.stages.context import RunContext

    ctx = RunContext(run_dir=tmp_path / "run")
    cfg = TrainConfig(max_steps=6, batch_size=4, save_every=save_every, log_every=1, eval_every=1, seed=0)
    log = functools.partial(ctx.log, "sft")
    eval_fn = lambda m: {"eval_loss": 1.0}  # noqa: E731
    with pytest.raises(Interrupted):  # steps 1-3 logged; the checkpoint, if any, holds 2
        train(tiny_lm.tiny_llama(tok), killed_at(3, sft_batches(items, cfg)), lm_loss_sum, cfg,
              ctx.stage_dir("sft"), log, eval_fn=eval_fn)
    result = train(tiny_lm.tiny_llama(tok), sft_batches(items, cfg), lm_loss_sum, cfg, ctx.stage_dir("sft"), log,
                   eval_fn=eval_fn)
    rows = ctx.read_metrics("sft")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "eval_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows if "loss" in r] == pytest.approx(result.losses)  # the resumed run's step 3
    assert "6 logged steps" in write_report(ctx.run_dir, sections=report_sections()).read_text()


def test_wall_time_and_throughput_of_a_resumed_run_cover_every_attempt(tok, items, tmp_path):
    import time

    cfg = TrainConfig(max_steps=6, batch_size=4, save_every=2, seed=0)
    tokens = {}

    def slow(step):
        time.sleep(0.2)
        return sft_batches(items, cfg)(step)

    def counting_loss(model, batch):
        loss, n = lm_loss_sum(model, batch)
        tokens[int(batch["step"])] = n
        return loss, n

    def batch_at(step):
        return [{**b, "step": torch.tensor(step)} for b in slow(step)]

    with pytest.raises(Interrupted):
        train(tiny_lm.tiny_llama(tok), killed_at(2, batch_at), counting_loss, cfg, tmp_path, no_log)
    first = load_checkpoint(latest_checkpoint(tmp_path), tiny_lm.tiny_llama(tok))
    assert first["step"] == 2 and first["elapsed"] >= 0.4
    resumed = train(tiny_lm.tiny_llama(tok), batch_at, counting_loss, cfg, tmp_path, no_log)
    assert resumed.wall_time >= 6 * 0.2  # steps 0-1 of the first attempt and 2-5 of this one
    assert resumed.tokens_per_s * resumed.wall_time == pytest.approx(sum(tokens[s] for s in range(6)))


KILLED_DURING_THE_SECOND_SAVE = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
import tiny_lm, test_train_loop as t
from lmcycle.train.loop import TrainConfig, lm_loss_sum, train
tok = tiny_lm.make_tokenizer()
model = tiny_lm.tiny_llama(tok)
import lmcycle.train.checkpoint as ck
saves, rng_state = [], ck.rng_state
def rng_state_then_die():  # called inside the checkpoint's atomic_dir, after DCP wrote the shards there
    saves.append(1)
    if len(saves) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return rng_state()
ck.rng_state = rng_state_then_die
cfg = TrainConfig(max_steps=3, batch_size=2, save_every=1, seed=0)
items = t.encode_sft(tiny_lm.examples(32, seed=2), t.get_template("summarize"), tok, max_len=64, seq2seq=False)
train(model, t.sft_batches(items, cfg), lm_loss_sum, cfg, sys.argv[1], t.no_log)
"""


def test_a_save_cut_by_a_kill_leaves_nothing_once_the_run_resumes(tok, items, tmp_path):
    import signal
    import subprocess
    import sys

    here = Path(__file__).parent
    proc = subprocess.run([sys.executable, "-c", KILLED_DURING_THE_SECOND_SAVE, str(tmp_path), str(here)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = tmp_path / "checkpoints"
    assert [p.name for p in root.glob(".step-2.*.tmp")] and [s for s, _ in list_checkpoints(tmp_path)] == [1]
    cfg = TrainConfig(max_steps=3, batch_size=2, save_every=1, seed=0)
    assert train(tiny_lm.tiny_llama(tok), sft_batches(items, cfg), lm_loss_sum, cfg, tmp_path, no_log).step == 3
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]


def test_resuming_with_other_settings_is_refused_unless_forced(tok, items, tmp_path):
    cfg = TrainConfig(max_steps=4, batch_size=4, lr=5e-3, save_every=1, seed=0)
    with pytest.raises(Interrupted):
        train(tiny_lm.tiny_llama(tok), killed_at(2, sft_batches(items, cfg)), lm_loss_sum, cfg, tmp_path, no_log)
    changed = cfg.model_copy(update={"lr": 1e-3, "max_steps": 5})
    with pytest.raises(LmcycleError, match=r"step-2: field 'train.lr': .*train.lr 0.005 → 0.001, "
                                           r"train.max_steps 4 → 5\).*force_resume"):
        train(tiny_lm.tiny_llama(tok), sft_batches(items, changed), lm_loss_sum, changed, tmp_path, no_log)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]  # the refusal touched nothing
    # How often it logs, evaluates or saves changes no number: that is accepted as it is.
    cadence = cfg.model_copy(update={"log_every": 1, "keep_checkpoints": 3, "spike_factor": None})
    with pytest.raises(Interrupted):  # resumed, trained step 3, then killed
        train(tiny_lm.tiny_llama(tok), killed_at(3, sft_batches(items, cadence)), lm_loss_sum, cadence, tmp_path,
              no_log)
    assert latest_checkpoint(tmp_path).name == "step-3"
    forced = changed.model_copy(update={"force_resume": True})
    result = train(tiny_lm.tiny_llama(tok), sft_batches(items, forced), lm_loss_sum, forced, tmp_path, no_log)
    assert result.step == 5 and len(result.losses) == 5
