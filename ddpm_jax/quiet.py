"""TensorFlow's start-up chatter, hidden before TensorFlow is imported.

clu's metric writers and tfds import TensorFlow, whose C++ libraries print "WARNING: All log
messages before absl::InitializeLog() is called are written to STDERR" and "I0000 ... port.cc:153]
oneDNN custom operations are on ..." (twice) while they load, before any line of ours: a bad
input's one-line error came after them. TF_CPP_MIN_LOG_LEVEL hides TensorFlow's later C++ lines
but not these (TF 2.21 logs them while its libraries load, before it reads the variable), so the
import of TensorFlow itself runs with stderr captured, and only its C++ log lines below the level
are dropped; everything else written meanwhile is passed on. oneDNN itself stays on.

Every command-line entry point calls `silence_tensorflow()` first, in one line. DDPM_JAX_TF_LOGS=1
leaves TensorFlow's logging as TensorFlow has it; a TF_CPP_MIN_LOG_LEVEL the user set is kept
(and applied to the start-up lines too).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile

ENV_VAR = "DDPM_JAX_TF_LOGS"
# A C++ log line (absl/glog format; Python's absl lines name a .py file and are kept).
_CPP_LOG_LINE = re.compile(r"([IWEF])\d{4} [\d:. ]+ \d+ [\w./-]+\.(?:cc|h|cpp):\d+\] ")
_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_LEVELS = {"I": 0, "W": 1, "E": 2, "F": 3}


def silence_tensorflow() -> None:
    """Hides TensorFlow's C++ log lines below TF_CPP_MIN_LOG_LEVEL (default 3: fatal only) and its
    Python logger's below ERROR, unless DDPM_JAX_TF_LOGS=1. Call it before anything imports
    TensorFlow."""
    if os.environ.get(ENV_VAR, "0") not in ("", "0"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # tf.get_logger() returns this logger and keeps a level set on it before the import.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    if not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


def min_log_level(environ=os.environ) -> int:
    """TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it (0 to 3; unset or not a number: 0)."""
    try:
        return int(environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def filter_startup_lines(text: str, level: int) -> str:
    """`text` without TensorFlow's C++ log lines below `level` (and absl's banner above them)."""
    kept = []
    for line in text.splitlines(keepends=True):
        match = _CPP_LOG_LINE.match(line)
        if (match and _LEVELS[match.group(1)] < level) or (level > 0 and line.startswith(_BANNER)):
            continue
        kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def _stderr_filtered(level: int):
    """Captures file descriptor 2 (C++ and Python writes alike), then writes back what
    `filter_startup_lines` keeps; on an exception too, so a failed import still shows its cause."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = filter_startup_lines(captured.read().decode(errors="replace"), level)
            if text:
                os.write(2, text.encode())


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` as usual, once, and runs its loading under `_stderr_filtered`."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # the first import is the one that loads the libraries
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _FilteredLoader(spec.loader)
        return spec


class _FilteredLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def __getattr__(self, name):  # get_resource_reader, is_package, ...: the real loader's
        return getattr(self.loader, name)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader  # as if it had loaded alone
        with _stderr_filtered(min_log_level()):
            self.loader.exec_module(module)
