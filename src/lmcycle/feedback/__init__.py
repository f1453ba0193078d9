"""Human feedback: a label database for ranking model completions (the labeling app's storage).

- :mod:`~lmcycle.feedback.db`: SQLite or Postgres behind the same few calls, a connection per thread.
- :mod:`~lmcycle.feedback.schema`: the tables, as ordered migrations with a schema version.
- :mod:`~lmcycle.feedback.items`: completions files (a prompt and its k completions per line), checked.
- :mod:`~lmcycle.feedback.labels`: what a labeler submits (a ranking with ties, or a special label; ratings)
  and its checks.
- :mod:`~lmcycle.feedback.store`: :class:`LabelStore`: accounts, projects, assignment with overlap, idempotent
  submissions, undo.
- :mod:`~lmcycle.feedback.export`: the ``rankings`` format lmcycle trains on, or plain JSON Lines.
- :mod:`~lmcycle.feedback.stats`: done / left, gold accuracy, too-fast submissions.
- :mod:`~lmcycle.feedback.agreement`: labeler agreement (tau-b, Krippendorff's alpha), Borda consensus,
  outliers, weights for the reward model's loss.
- :mod:`~lmcycle.feedback.web`: the labeling app (pages for labelers and the admin, a JSON API).
- :mod:`~lmcycle.feedback.simulate`: simulated labelers (noisy oracles) that label through that API.

A technique library: it imports nothing from the recipe layer (stages, report, cli); ``lmcycle label`` is
``cli/label.py``.
"""

from lmcycle.feedback.items import Completion, ItemSpec, read_completions
from lmcycle.feedback.labels import Label, RatingScale
from lmcycle.feedback.store import Conflict, Forbidden, LabelStore, NotFound, StoredLabel, Task

__all__ = ["Completion", "Conflict", "Forbidden", "ItemSpec", "Label", "LabelStore", "NotFound", "RatingScale",
           "StoredLabel", "Task", "read_completions"]
