"""TensorRT, imported only when an engine is built or run, with one line saying what to install.

Both the builder (`vlmedge.tensorrt`) and the runtime's TensorRT backend import it through `load()`,
so neither borrows it from the other.
"""

from __future__ import annotations

from vlmedge.errors import BuildError, first_line

INSTALL_HINT = ("TensorRT's Python package is not installed: on Jetson use JetPack's system TensorRT "
                "(a venv with --system-site-packages); on x86, pip install tensorrt")


def load():
    """The `tensorrt` module; BuildError naming what to install if it cannot be imported."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: a wheel whose libnvinfer cannot be loaded
        detail = "" if isinstance(e, ModuleNotFoundError) else f" ({first_line(e)})"
        raise BuildError(INSTALL_HINT + detail) from None
    return tensorrt
