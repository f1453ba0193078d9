"""report.md of a run directory: the page (:mod:`.page`), the run it reads (:mod:`.rundir`) and the formatting
its sections share (:mod:`.markdown`). The stage sections themselves live with their stages."""

from lmcycle.report.page import Section, chapter, training, write_report
from lmcycle.report.rundir import Run

__all__ = ["Run", "Section", "chapter", "training", "write_report"]
