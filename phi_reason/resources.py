"""Files that ship with the package: the run configs, `configs/*.yaml` at the checkout's root.

setup.py maps the checkout's `configs/` to the data-only package `phi_reason.configs`, so a wheel
(or `pip install .`) carries them inside the installed package, where `importlib.resources` finds
them. A plain checkout on sys.path has no `phi_reason/configs`, and neither does an editable install
that `importlib.resources` can see: setuptools' editable finder records the mapping but cannot
import a mapped subpackage without an `__init__.py` (pypa/setuptools#4943). Both run from the
checkout, whose `configs/` beside the package is then the one copy. There is never a second copy.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

CONFIGS_PACKAGE = "phi_reason.configs"
_PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE_DIR.parent


def config_path(name: str) -> Path:
    """The shipped run config `name` (e.g. "demo.yaml"); callers check that it exists."""
    try:
        found = resources.files(CONFIGS_PACKAGE) / name
    except ModuleNotFoundError:
        found = None
    # files() of this data-only (namespace) package is a MultiplexedPath whose children are real
    # files (pip installs wheels unpacked); a zip import would give no file-system path.
    if isinstance(found, Path):
        return found
    if (_CHECKOUT / "setup.py").is_file():  # a checkout (plain or editable): its configs/
        return _CHECKOUT / "configs" / name
    # An installed package without its configs: name the place the wheel should have put it (not
    # a stray site-packages/configs/ of some other distribution).
    return _PACKAGE_DIR / "configs" / name
