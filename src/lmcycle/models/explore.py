"""The decoding explorer: what each decoding setting does to the model's next-token distribution.

For one prompt it takes the model's next-token distribution once and, for each setting (greedy, a temperature,
top-k, top-p, ...), shows which of the most likely tokens survive the setting's transforms, their renormalised
probabilities, the token the setting picks, and a sampled continuation. The picked token is the first token of
that continuation: both come from the same code path and random stream as :func:`~lmcycle.models.generate.generate`.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmcycle.atomic import atomic_write_bytes
from lmcycle.data.batching import pad_id_of
from lmcycle.models.generate import (
    DecodingConfig,
    choose_next_tokens,
    describe,
    encode_prompts,
    generate,
    logit_stream,
    next_token_probs,
    prompt_generator,
)
from lmcycle.models.load import eval_mode


def default_settings() -> list[DecodingConfig]:
    """Greedy, a cold and a hot temperature, top-k and top-p: the classic comparison."""
    n = 24
    return [
        DecodingConfig(max_new_tokens=n),
        DecodingConfig(do_sample=True, temperature=0.5, max_new_tokens=n),
        DecodingConfig(do_sample=True, temperature=1.5, max_new_tokens=n),
        DecodingConfig(do_sample=True, top_k=5, max_new_tokens=n),
        DecodingConfig(do_sample=True, top_p=0.9, max_new_tokens=n),
    ]


@torch.no_grad()
def next_token_logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str) -> torch.Tensor:
    """The model's logits ``(vocab,)`` for the token that follows ``prompt`` (first decoder token for T5)."""
    with eval_mode(model):
        rows = encode_prompts(model, tokenizer, [prompt], DecodingConfig(max_new_tokens=1))
        stream = logit_stream(model, rows, pad_id_of(tokenizer))
        logits = next(stream)[0]
        stream.close()
    return logits


def token_label(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """How a token is shown: special tokens by name, others as a Python repr so spaces and newlines are visible.

    A token that is only part of a multi-byte character (it decodes to U+FFFD) is shown as its bytes,
    ``b'\\xe2\\x80'``, so that such tokens stay distinguishable.
    """
    if token_id in set(tokenizer.all_special_ids):
        return str(tokenizer.convert_ids_to_tokens(token_id))
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:
        piece = str(tokenizer.convert_ids_to_tokens(token_id))
        alphabet = _byte_level_alphabet()
        if piece and all(ch in alphabet for ch in piece):
            return repr(bytes(alphabet[ch] for ch in piece))
        if piece.startswith("<0x"):  # SentencePiece byte fallback already names its byte
            return piece
    return repr(text)


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE writes byte b as a printable character; this maps each such character back to b."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    alphabet, shifted = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[chr(b)] = b
        else:
            alphabet[chr(256 + shifted)] = b
            shifted += 1
    return alphabet


def next_token_distribution(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str,
                            top_n: int = 20) -> list[tuple[str, float]]:
    """The ``top_n`` most likely next tokens and their probabilities (temperature 1, nothing filtered)."""
    probs = next_token_logits(model, tokenizer, prompt).softmax(dim=-1)
    top = torch.topk(probs, min(top_n, probs.shape[-1]))
    return [(tokenizer.decode([i]), float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def explore(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str,
            settings: list[DecodingConfig], top_n: int = 20) -> dict[str, Any]:
    """What each setting does to the next-token distribution of ``prompt``.

    Returns ``{"prompt", "tokens": [{"id", "label", "prob"}], "settings": [...]}`` where ``tokens`` are the
    ``top_n`` most likely next tokens (plus any token a setting picked outside them) and each setting has
    ``label``, ``config``, ``probs`` (its probability of each listed token after its transforms), ``kept``
    (whether the token survives), ``kept_count`` (survivors in the whole vocabulary), ``chosen`` (token id it
    picks) and ``continuation`` (text it generates).
    """
    logits = next_token_logits(model, tokenizer, prompt)
    base = logits.softmax(dim=-1)
    per_setting = []
    for cfg in settings:
        probs = next_token_probs(logits[None], cfg)[0]
        chosen = int(choose_next_tokens(logits[None], cfg, [prompt_generator(cfg.seed, 0)])[0])
        per_setting.append((cfg, probs, chosen, generate(model, tokenizer, [prompt], cfg)[0]))
    ids = torch.topk(base, min(top_n, base.shape[-1])).indices.tolist()
    ids += sorted({chosen for _, _, chosen, _ in per_setting} - set(ids), key=lambda i: -float(base[i]))
    return {
        "prompt": prompt,
        "tokens": [{"id": i, "label": token_label(tokenizer, i), "prob": float(base[i])} for i in ids],
        "settings": [
            {
                "label": describe(cfg),
                "config": cfg.model_dump(),
                "probs": [float(probs[i]) for i in ids],
                "kept": [bool(probs[i] > 0) for i in ids],
                "kept_count": int((probs > 0).sum()),
                "chosen": chosen,
                "chosen_label": token_label(tokenizer, chosen),
                "continuation": continuation,
            }
            for cfg, probs, chosen, continuation in per_setting
        ],
    }


# -- presentation -------------------------------------------------------------------------------------------
KEPT, REMOVED, CHOSEN = "#4C72B0", "#C8C8C8", "#DD8452"


def plot_exploration(result: dict[str, Any], path: str | os.PathLike) -> None:
    """One panel per setting: bars of the listed tokens' probabilities under that setting.

    Kept tokens are blue (outlined at their original probability), removed tokens grey at their original
    probability, the picked token orange; the panel title names the setting and its continuation.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tokens = result["tokens"]
    settings = result["settings"]
    labels = [_clip(t["label"], 18) for t in tokens]
    base = [t["prob"] for t in tokens]
    cols = min(3, len(settings))
    rows = -(-len(settings) // cols)
    height = 1.6 + 0.26 * len(tokens)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, height * rows), squeeze=False)
    for ax, s in zip(axes.flat, settings, strict=False):
        chosen_row = next((k for k, t in enumerate(tokens) if t["id"] == s["chosen"]), None)
        colours = [CHOSEN if k == chosen_row else KEPT if kept else REMOVED for k, kept in enumerate(s["kept"])]
        widths = [p if kept else b for p, b, kept in zip(s["probs"], base, s["kept"], strict=True)]
        y = range(len(tokens))
        ax.barh(y, base, color="none", edgecolor="#888888", linewidth=0.6, linestyle=":")
        ax.barh(y, widths, color=colours)
        ax.set_yticks(list(y), labels, fontfamily="monospace", fontsize=8)
        for k, tick in enumerate(ax.get_yticklabels()):
            if k == chosen_row:
                tick.set_color(CHOSEN)
                tick.set_fontweight("bold")
            elif not s["kept"][k]:
                tick.set_color("#999999")
        ax.invert_yaxis()
        ax.set_xlim(0, 1.02 * max(max(widths), max(base), 1e-9))
        ax.set_xlabel("probability")
        ax.set_title(f"{s['label']}  ({_kept_text(s['kept_count'])})\n→ {_clip(repr(s['continuation']), 46)}",
                     fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(settings):]:
        ax.axis("off")
    fig.legend(handles=[Patch(color=KEPT, label="kept (renormalised)"), Patch(color=CHOSEN, label="picked"),
                        Patch(color=REMOVED, label="removed (original prob.)"),
                        Patch(facecolor="none", edgecolor="#888888", linestyle=":", label="original prob.")],
               loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"Next token after …{_clip(repr(result['prompt'][-70:]), 80)}", fontsize=10)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Generated text may hold characters the default font lacks; they are drawn as boxes, which is fine.
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def exploration_markdown(result: dict[str, Any]) -> str:
    """Two markdown tables: each listed token's probability per setting, and what each setting generates."""
    settings = result["settings"]
    head = "| token | p | " + " | ".join(_cell(s["label"]) for s in settings) + " |"
    lines = [head, "|" + "---|" * (2 + len(settings))]
    for k, t in enumerate(result["tokens"]):
        cells = []
        for s in settings:
            value = f"{s['probs'][k]:.3f}" if s["kept"][k] else "–"
            cells.append(f"**{value}** ←" if s["chosen"] == t["id"] else value)
        lines.append(f"| {_cell(t['label'])} | {t['prob']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "| setting | tokens kept | picked | continuation |", "|---|---|---|---|"]
    for s in settings:
        lines.append(f"| {_cell(s['label'])} | {s['kept_count']} | {_cell(s['chosen_label'])} | "
                     f"{_cell(repr(s['continuation']))} |")
    return "\n".join(lines) + "\n"


def _kept_text(n: int) -> str:
    return "1 token kept" if n == 1 else f"{n} tokens kept"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"

