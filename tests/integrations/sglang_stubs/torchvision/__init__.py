"""Inert stand-in for torchvision, used only by sglang_driver.py when torchvision is absent: SGLang's
config package imports it for vision models at import time; no test touches images. Every attribute
and submodule is an inert placeholder."""
import importlib.abc, importlib.machinery, sys, types

class _Any:
    def __init__(self, *a, **k): pass
    def __call__(self, *a, **k): return _Any()
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any()
    def __iter__(self): return iter(())
    def __mro_entries__(self, bases): return (object,)

class _Mod(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any()

class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None
    def create_module(self, spec):
        m = _Mod(spec.name)
        m.__path__ = []
        return m
    def exec_module(self, module):
        pass

sys.meta_path.insert(0, _Finder())
__path__ = []
__version__ = "0.0.0"
def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Any()
