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


def cause_chain(e: BaseException) -> list[BaseException]:
    """`e` and the exceptions it was raised from (`raise ... from`), outermost first. Implicit context
    ("during handling of ...") is not followed: the exception raised last says more than the one it replaced."""
    chain = [e]
    while chain[-1].__cause__ is not None and all(c is not chain[-1].__cause__ for c in chain):
        chain.append(chain[-1].__cause__)
    return chain


def one_line(text: str, limit: int = 300) -> str:
    """The first non-blank line of `text`, terminal escape codes dropped, spaces collapsed, at most `limit` characters."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    line = next((" ".join(l.split()) for l in text.splitlines() if l.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def summary_line(e: BaseException, limit: int = 300) -> str:
    """`module.Type: first line of the message` (builtins unqualified), on one line of at most `limit` characters."""
    kind = type(e).__qualname__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__qualname__}"
    message = one_line(str(e), limit)
    return one_line(f"{kind}: {message}" if message else kind, limit)


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
