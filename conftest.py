"""Repository-wide pytest setup: real storage servers as fixtures (see lmcache_core/testing/fixtures.py)."""

import importlib.util

# Under --import-mode=importlib pytest names kernels/tests/conftest.py `kernels.tests.conftest`
# and, if no module `kernels` is loaded yet, registers our kernels/ folder as a namespace
# package of that name. Hugging Face's `kernels` distribution (a dependency of transformers
# since 5.25) has the same import name, so transformers' `from kernels import ...` then hit our
# folder and every model test failed with "cannot import name 'CUDAProperties' from 'kernels'".
# Loading the installed package first keeps it: pytest only hangs our test folder under it.
_spec = importlib.util.find_spec("kernels")
if _spec is not None and _spec.origin:  # a real package, not our folder seen as a namespace
    importlib.import_module("kernels")

pytest_plugins = ["lmcache_core.testing.fixtures"]
