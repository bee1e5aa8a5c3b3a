"""napari plugin: cryodask OME-Zarr stores (image, label images) and picks files as layers.

napari hands a folder to every reader plugin that accepts folders (its builtins,
napari-ome-zarr, cryodask) and asks the user to choose unless its reader preferences
(``settings.plugins.extension2reader``, what the dialog's "remember" box writes) name one:
``prefer()`` adds cryodask's patterns there, never replacing a choice the user made.
"""

from __future__ import annotations

# the files cryodask writes: stores, its own picks CSV, copick picks (STAR is only ours)
PATTERNS = ("*.zarr/", "*_picks.csv", "*/Picks/*.json")


def prefer(patterns=PATTERNS) -> dict[str, str]:
    """Make cryodask napari's reader for ``patterns`` where no reader is preferred yet;
    returns the patterns it set."""
    from napari.settings import get_settings

    settings = get_settings()
    current = dict(settings.plugins.extension2reader)
    added = {p: "cryodask" for p in patterns if p not in current}
    if added:
        settings.plugins.extension2reader = {**current, **added}
    return added


def activate(context=None) -> None:
    """npe2 ``on_activate``: the first time napari runs cryodask's reader, remember it."""
    prefer()
