"""Which framework wrote a model file, told from its first bytes where the file name leaves a choice.

``.bst`` is KServe's file name for XGBoost and for LightGBM models alike, and ``.json`` is XGBoost's
format but also every configuration file that can sit beside a model (MLServer's ``model-settings.json``,
a metadata file). Reading the start of the file settles both without importing either library:

* LightGBM's text format (what ``Booster.save_model`` writes, whatever the file is called) opens with a
  ``tree`` line followed by ``version=v<N>``.
* XGBoost's JSON opens with ``{`` and names its ``"learner"`` within the first bytes; its UBJSON (``.ubj``
  or ``.bst``) opens with the ``{`` marker and holds the key ``learner`` just as early. The legacy binary
  format opens with ``binf``.

Anything else is no model of either; the caller decides whether that is an error (a ``.bst`` that is
neither) or simply a file to ignore (a ``.json`` that is configuration). Standard library only.
"""

from __future__ import annotations

from pathlib import Path

HEAD_BYTES = 512
AMBIGUOUS = (".bst", ".json")


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read(HEAD_BYTES)
    except OSError:
        return b""


def sniff_booster(path: Path | str) -> str | None:
    """``"xgboost"``, ``"lightgbm"`` or None when the file starts like neither."""
    head = _head(Path(path))
    text = head.lstrip()
    lines = text.splitlines()
    if lines and lines[0].strip() == b"tree" and any(line.startswith(b"version=v") for line in lines[1:4]):
        return "lightgbm"
    if text.startswith(b"{") and b"learner" in head:
        return "xgboost"
    if head.startswith(b"binf"):
        return "xgboost"
    return None


def is_model_of(path: Path | str, framework: str) -> bool:
    """Whether ``path`` may be a ``framework`` model: decided by content for ``.bst`` and ``.json``
    files, by name alone for every other extension."""
    if Path(path).suffix.lower() not in AMBIGUOUS:
        return True
    return sniff_booster(path) == framework
