"""Reading a YAML file a person wrote: every way it can fail, in one sentence."""

from __future__ import annotations

from pathlib import Path

import yaml


class UnreadableYAML(Exception):
    """Why a YAML file cannot be read; the message completes "<file>: ..."."""


def read_yaml(path: str | Path) -> object:
    """
    The parsed contents of a YAML file.

    :raises UnreadableYAML: the file cannot be read, is not UTF-8, or is not YAML.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UnreadableYAML(f"cannot read it: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UnreadableYAML("it is not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise UnreadableYAML(f"it is not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise UnreadableYAML("it is not usable YAML: nested too deeply") from None
