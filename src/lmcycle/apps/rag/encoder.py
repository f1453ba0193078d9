"""Sentence encoder for queries and passages: a Hugging Face encoder, pooled and L2-normalised.

The default is all-MiniLM-L6-v2 (offline through ``lmcycle.models.load.local_copy``). Its sentence-transformers
files say what to do: ``modules.json`` lists Transformer -> Pooling -> Normalize, ``1_Pooling/config.json`` has
``pooling_mode_mean_tokens: true`` and ``sentence_bert_config.json`` has ``max_seq_length: 256``. So: mean of
the last hidden states over the attention mask, then L2 normalisation, inputs truncated to 256 tokens -- which is
what sentence-transformers computes for this model. Other folders are read the same way (CLS pooling when the
pooling config asks for it); a plain HF encoder without these files gets mean pooling + normalisation and its
tokenizer's length limit (at most 512). Embeddings are float32 numpy arrays of shape ``(n, d)``; with
normalisation, inner product = cosine similarity.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lmcycle.errors import LmcycleError
from lmcycle.models.device import resolve_device
from lmcycle.models.load import MINILM, local_copy

DEFAULT_ENCODER = MINILM
PROGRESS_MIN_TEXTS = 256  # show a progress bar from this many texts on


class Encoder:
    """Encodes texts with ``name_or_path`` (a local folder or a Hub id).

    ``query_prefix`` / ``passage_prefix`` are prepended for asymmetric models (E5: ``"query: "`` /
    ``"passage: "``); MiniLM is symmetric and needs none. ``device``: ``auto`` (CUDA when present, else CPU),
    ``cpu``, ``cuda`` or ``cuda:N``.
    """

    def __init__(self, name_or_path: str = DEFAULT_ENCODER, *, batch_size: int = 32, device: str = "auto",
                 max_length: int | None = None, query_prefix: str = "", passage_prefix: str = ""):
        from transformers import AutoModel, AutoTokenizer

        self.name = name_or_path
        source = local_copy(name_or_path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModel.from_pretrained(source).to(resolve_device(device)).eval()
        except (OSError, ValueError) as e:
            raise LmcycleError(f"cannot load encoder '{name_or_path}': {e}", field="encoder") from e
        self.pooling, self.normalize, folder_max = _sentence_config(source)
        self.max_length = max_length or folder_max or min(int(self.tokenizer.model_max_length), 512)
        self.batch_size, self.device = batch_size, self.model.device
        self.query_prefix, self.passage_prefix = query_prefix, passage_prefix

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode_queries(self, texts: list[str], progress: bool | None = None) -> np.ndarray:
        return self.encode([self.query_prefix + t for t in texts], progress)

    def encode_passages(self, texts: list[str], progress: bool | None = None) -> np.ndarray:
        return self.encode([self.passage_prefix + t for t in texts], progress)

    @torch.no_grad()
    def encode(self, texts: list[str], progress: bool | None = None) -> np.ndarray:
        """Embeddings of ``texts``: float32 ``(len(texts), dim)``, rows in input order.

        Texts are batched longest-first (less padding); a row does not depend on its batch-mates.
        """
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        show = len(texts) >= PROGRESS_MIN_TEXTS if progress is None else progress
        for lo in tqdm(range(0, len(texts), self.batch_size), desc="encode", unit="batch", disable=not show):
            rows = order[lo:lo + self.batch_size]
            batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state  # (b, t, d)
            pooled = pool(hidden, batch["attention_mask"], self.pooling)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            out[rows] = pooled.float().cpu().numpy()
        return out


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """``(b, t, d)`` hidden states and ``(b, t)`` attention mask -> ``(b, d)``: masked mean, or the first token."""
    if mode == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def _sentence_config(folder: str) -> tuple[str, bool, int | None]:
    """(pooling mode, normalise?, max_seq_length) from a sentence-transformers folder; defaults otherwise."""
    root = Path(folder)
    if not root.is_dir():
        return "mean", True, None
    pooling, normalize, max_len = "mean", True, None
    modules = _read_json(root / "modules.json")
    if modules is not None:
        types = [m.get("type", "") for m in modules]
        normalize = any(t.endswith("Normalize") for t in types)
        for m in modules:
            if m.get("type", "").endswith("Pooling"):
                cfg = _read_json(root / m.get("path", "") / "config.json") or {}
                if cfg.get("pooling_mode_cls_token"):
                    pooling = "cls"
                elif not cfg.get("pooling_mode_mean_tokens", True):
                    raise LmcycleError(f"unsupported pooling in {root / m.get('path', '')}: only mean or CLS",
                                       file=root / m.get("path", "") / "config.json")
    sbert = _read_json(root / "sentence_bert_config.json") or {}
    if "max_seq_length" in sbert:
        max_len = int(sbert["max_seq_length"])
    return pooling, normalize, max_len


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LmcycleError(f"cannot read JSON: {e}", file=path) from e
