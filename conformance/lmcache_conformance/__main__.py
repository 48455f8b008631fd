"""``python -m lmcache_conformance ARGS``: the same as ``lmcache conformance ARGS``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
