"""Import every module Slicer loads, with stand-ins for torch, numpy and Slicer's own packages.

Run by ``test_slicer_py39.py`` with CPython 3.9 (the Python of Slicer 5.8), and with the test's
own Python as a control. Installing torch for 3.9 costs gigabytes, so the third-party packages
are replaced by permissive fakes: any attribute is a class, any call returns an object, a
decorator factory returns the function unchanged. What the fakes deliberately do NOT give a
class is ``|``: ``torch.Tensor | None`` in a module-level alias raises ``TypeError`` on 3.9
exactly as the real class does, and works on 3.10+ (``type.__or__``). So a failure here means
"this module cannot be imported by Slicer 5.8", and the control run on the test's own Python
proves the fakes themselves are not the cause.

Usage: python py39_import_check.py <model/src> <FastSAM3DSlicer dir> <module> [<module> ...]
Prints one ``OK <module>`` or ``FAIL <module>: <error>`` line per module; exit status 1 on any
failure.
"""

# This file itself runs on 3.9: nothing newer is used in it.
import importlib
import importlib.abc
import importlib.machinery
import sys
import traceback
import types

FAKE_ROOTS = {
    # numerical stack and optional IO (absent from a bare 3.9)
    "torch",
    "numpy",
    "scipy",
    "safetensors",
    "SimpleITK",
    "nibabel",
    "tqdm",
    "triton",
    "matplotlib",
    "torchio",
    "monai",
    # what the Slicer application provides
    "slicer",
    "vtk",
    "qt",
    "ctk",
    "SampleData",
    "PyTorchUtils",
    "SegmentEditorEffects",
}
VERSIONS = {"torch": "2.13.0", "numpy": "2.0.0"}


class _FakeMeta(type):
    """Metaclass of every fake class: attributes and subscripts give more fake classes."""

    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        sub = _FakeMeta(name, (_Fake,), {"__module__": cls.__module__})
        type.__setattr__(cls, name, sub)
        return sub

    def __getitem__(cls, item):
        return cls

    def __call__(cls, *args, **kwargs):
        # `@torch.jit.script` and friends: return the decorated function unchanged.
        if len(args) == 1 and not kwargs and isinstance(args[0], types.FunctionType):
            return args[0]
        return type.__call__(cls, *args, **kwargs)

    # Deliberately no __or__ / __ror__: see the module docstring.


class _Fake(metaclass=_FakeMeta):
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]  # `@torch.no_grad()`, `@functools.lru_cache(...)`-like factories
        return _Fake()

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return getattr(type(self), name)

    def __getitem__(self, item):
        return _Fake()

    def __iter__(self):
        return iter(())

    def __bool__(self):
        return False

    def __len__(self):
        return 0

    def __int__(self):
        return 0

    __index__ = __int__

    def __float__(self):
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _same(self, *args):
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _same
    __truediv__ = __rtruediv__ = __floordiv__ = __pow__ = __neg__ = __matmul__ = _same

    def __lt__(self, other):
        return False

    __le__ = __gt__ = __ge__ = __lt__


class _FakeModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = _FakeMeta(name, (_Fake,), {"__module__": self.__name__})
        setattr(self, name, value)
        return value


class _FakeFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in FAKE_ROOTS:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _FakeModule(spec.name)
        module.__path__ = []
        module.__version__ = VERSIONS.get(spec.name, "1.0")
        return module

    def exec_module(self, module):
        pass


def main(argv):
    model_src, module_dir, names = argv[1], argv[2], argv[3:]
    # Before the real site-packages: an installed torch must not hide what 3.9 would do.
    sys.meta_path.insert(0, _FakeFinder())
    sys.path[:0] = [model_src, module_dir]
    failed = 0
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - reported per module
            failed += 1
            where = traceback.extract_tb(e.__traceback__)[-1]
            print(
                f"FAIL {name}: {type(e).__name__}: {e} "
                f"({where.filename}:{where.lineno}: {where.line})"
            )
        else:
            print(f"OK {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
