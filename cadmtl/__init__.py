"""cad-mtl: the project's jobs, one wing per folder.

``modeling_cadmtl`` (the files that ship to the Hub) and ``dataset_scripts`` (the CAD 100K tooling) sit below
this package; nothing in them imports ``cadmtl``. See ARCHITECTURE.md for the wings and their import rules.
"""

__version__ = "0.1.0"
