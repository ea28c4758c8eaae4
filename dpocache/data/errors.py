"""Bad input: one exception whose message names the source, the row and the defect."""

from __future__ import annotations


class DataError(ValueError):
    """A data defect. ``str(err)`` is ``"SOURCE, ROW: DEFECT"`` (``"SOURCE: DEFECT"`` for whole-source
    defects); ``reason`` is a short key (``identical_pair``, ``unknown_role``...) used for skip counts."""

    def __init__(self, source: str, row: str | None, defect: str, *, reason: str = "invalid"):
        self.source, self.row, self.defect, self.reason = source, row, defect, reason
        where = f"{source}, {row}" if row else source
        super().__init__(f"{where}: {defect}")
