"""What every ``scripts/*.py`` rule entry shares: its log file, thread count and one-line errors.

    with rule_step(snakemake):      # inside a Snakemake `script:`
        fetch(...)

Inside the block stdout and stderr (file descriptors, so tqdm and subprocesses too) go to the rule's log; torch
uses the rule's threads. An LlmoptError is written as one line to the log and to Snakemake's own stderr and the job
fails with status 1, leaving no output behind (the stages write atomically; Snakemake removes declared outputs).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from llmopt.errors import LlmoptError


@contextlib.contextmanager
def rule_step(smk) -> Iterator[None]:
    """Run a rule's body with its log and threads; turn an LlmoptError into one line and exit status 1."""
    saved_err = os.dup(2)
    log = open(smk.log[0], "w") if smk.log else None
    if log is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        if "torch" in sys.modules:  # the script's imports decided whether this step uses torch
            sys.modules["torch"].set_num_threads(max(1, int(smk.threads)))
        yield
    except LlmoptError as err:
        line = f"llmopt: error: {err}\n"
        sys.stderr.write(line)
        sys.stderr.flush()
        os.write(saved_err, line.encode())
        sys.exit(1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if log is not None:
            log.close()
