#!/usr/bin/env python3
"""Run the real ``dpocache`` command line in this process and record what it used.

    python bench/cli_probe.py --probe_out OUT [--probe_root DIR] -- train --store ... (any dpocache command)

The command runs through ``dpocache.cli.main`` exactly as ``python -m dpocache.cli`` runs it (also under
``accelerate launch bench/cli_probe.py ...``: one record per rank). At exit (any exit) the process writes
``OUT.rank<RANK>.json`` with: the exit code, peak RSS (``VmHWM``: ``getrusage`` would include the launching
process's peak, which Linux carries across ``exec``), peak GPU memory
(``torch.cuda.max_memory_allocated``, when CUDA was used), the device name, and the bytes it read from
files while the command ran (``/proc/self/io`` ``rchar`` / ``read_bytes``, counted from after the heavy
imports below, so they are mostly the command's own data: store, tokenizer, config) plus the resident
size of memory-mapped files under ``--probe_root`` (reads through a memory map do not show in ``rchar``).
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def io_counters() -> dict:
    try:
        pairs = (line.split(":") for line in Path("/proc/self/io").read_text().splitlines())
        return {k.strip(): int(v) for k, v in pairs}
    except OSError:
        return {}


def peak_rss() -> int:
    """This process's own peak resident set size in bytes (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mapped_rss(root: str | None) -> int | None:
    """Resident bytes of this process's file mappings under ``root`` (``/proc/self/smaps``)."""
    if not root:
        return None
    root = os.path.realpath(root)
    total, inside = 0, False
    try:
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's header line
                inside = len(head) >= 6 and os.path.realpath(head[5]).startswith(root + os.sep)
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    except OSError:
        return None
    return total


def main(argv: list[str]) -> int:
    if "--" not in argv or argv[:1] != ["--probe_out"]:
        sys.exit("usage: cli_probe.py --probe_out OUT [--probe_root DIR] -- COMMAND ...")
    cut = argv.index("--")
    opts, command = dict(zip(argv[:cut:2], argv[1:cut:2])), argv[cut + 1:]
    import dpocache.cli as cli  # dpocache first: it sets allocator settings before torch allocates

    # The heavy imports happen here, before the counters start, so the counted reads are the command's.
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401

    import dpocache.stages.score  # noqa: F401
    import dpocache.stages.train  # noqa: F401

    start = io_counters()
    code = 1
    try:
        code = cli.main(command)
    finally:
        end = io_counters()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        record = {"command": command[:1], "exit_code": code, "rank": int(os.environ.get("RANK", "0")),
                  "peak_rss": peak_rss(),
                  "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                  "device_name": torch.cuda.get_device_name() if cuda else "cpu",
                  "rchar": end.get("rchar", 0) - start.get("rchar", 0),
                  "read_bytes": end.get("read_bytes", 0) - start.get("read_bytes", 0),
                  "mapped_rss": mapped_rss(opts.get("--probe_root"))}
        out = Path(f"{opts['--probe_out']}.rank{record['rank']}.json")
        out.write_text(json.dumps(record))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
