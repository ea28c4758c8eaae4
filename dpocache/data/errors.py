"""Bad input: one exception whose message names the source, the row and the defect."""

from __future__ import annotations


class DataError(ValueError):
    def __init__(self, source: str, row: str | None, defect: str, *, reason: str = "invalid"):
        self.source, self.row, self.defect, self.reason = source, row, defect, reason
        where = f"{source}, {row}" if row else source
        super().__init__(f"{where}: {defect}")
