"""``python -m cryodask.napari``: make napari open cryodask stores and picks without asking."""

from . import prefer

if __name__ == "__main__":
    from napari.settings import get_settings

    added = prefer()
    print(f"napari reader preferences ({get_settings().config_path}): "
          + (", ".join(f"{p} -> cryodask" for p in added) if added else "already set, unchanged"))
