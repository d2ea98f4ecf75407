"""The exceptions vlmedge raises for problems a user can fix; the CLI prints them on one line."""


class VlmedgeError(Exception):
    """Base class: the message names the file or field and what was expected."""

    exit_code = 2


class InputError(VlmedgeError):
    """A bad argument, image or question."""


class ModelLoadError(VlmedgeError):
    """A model directory, checkpoint or config that cannot be loaded."""


class BundleError(VlmedgeError):
    """A bundle that is missing files, has an unknown schema or fails its hashes."""


class ExportError(VlmedgeError):
    """Export could not trace or write a graph."""


class ValidationError(VlmedgeError):
    """Exported graphs disagree with the source model beyond tolerance."""


class BuildError(VlmedgeError):
    """A TensorRT engine could not be built or loaded."""


class OutputError(VlmedgeError):
    """An output could not be written (disk full, permission denied); the old one is left as it was."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type): enough for a one-line error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_json(path, error: type[VlmedgeError], max_bytes: int = 64 << 20):
    """Parse a JSON file; a file that is not JSON, too large or nested too deeply raises `error` naming it."""
    import json

    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: {size:,} bytes, over the limit of {max_bytes:,} for this file")
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to read") from None
    except MemoryError:
        raise error(f"{path}: too large to read into memory") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or first_line(e)})") from None


class DependencyError(VlmedgeError):
    """A package this step needs is not installed, or is the wrong build; the message says what to install."""
