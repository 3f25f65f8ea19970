import os
import sys

import pytest


@pytest.fixture(autouse=True)
def readable_stdin(monkeypatch):
    """NeMo-Run runs shell commands through invoke, which reads stdin; pytest's captured stdin
    refuses reads, so give it an empty one."""
    with open(os.devnull) as devnull:
        monkeypatch.setattr(sys, "stdin", devnull)
        yield
