"""Files and folders a command will write, checked before it does any work: the folder exists
and is writable, the name is not a folder, the extension is one the writer knows."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import HVAEError

PLOT_EXTS = (".png", ".pdf", ".svg")


def check_writable(path: Path, parse_error: bool = False) -> None:
    """Raise (HVAEError, or ArgumentTypeError for a flag's value) unless ``path`` can be written."""
    folder = os.path.dirname(os.path.abspath(path))
    why = (f"its folder {folder} does not exist: create it, or write elsewhere" if not os.path.isdir(folder) else
           f"{path} is a folder: name a file" if os.path.isdir(path) else
           f"{folder} is not writable: write elsewhere" if not os.access(folder, os.W_OK) else
           f"{path} is not writable: write elsewhere" if os.path.exists(path) and not os.access(path, os.W_OK) else None)
    if why:
        raise (argparse.ArgumentTypeError if parse_error else HVAEError)(f"cannot write {str(path)!r}: {why}")


def output_type(*exts):
    """Parser of a flag naming a file to write (with one of ``exts``, when given), checked by
    ``check_writable`` before any work."""
    def parse(s):
        path = Path(s)
        if "\0" in s or not s.strip():
            raise argparse.ArgumentTypeError(f"{s!r} is not a file name")
        if exts and path.suffix.lower() not in exts:
            raise argparse.ArgumentTypeError(f"cannot write {s!r}: use one of the extensions {', '.join(exts)}")
        check_writable(path, parse_error=True)
        return path
    return parse


def check_output_folder(path: Path) -> None:
    """Raise HVAEError unless ``path`` is a writable folder, or can be made one (an existing folder
    is fine: its files of the same names are replaced)."""
    path = Path(path)
    if path.exists():
        why = (f"it is a file: name a folder" if not path.is_dir() else
               "it is not writable: write elsewhere" if not os.access(path, os.W_OK | os.X_OK) else None)
    else:
        parent = next((p for p in path.absolute().parents if p.exists()), None)
        why = (None if parent is not None and parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
               else f"{parent} is not a writable folder: write elsewhere")
    if why:
        raise HVAEError(f"cannot write into {str(path)!r}: {why}")
