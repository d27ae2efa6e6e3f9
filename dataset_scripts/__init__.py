"""CAD 100K dataset tooling: build streamable Hugging Face dataset repos for car anomaly detection.

Commands (``cadmtl data <name> --help``; ``python -m dataset_scripts.<module>`` is an alias):

- ``make_demo OUT_DIR``: the deterministic ``cad100k-mini`` demo with all 8 CAD configs and ``exterior_ad``.
- ``make_public OUT_DIR [--data ../shared/data]``: the public benchmark (``parts_cls/det/seg``).
- ``convert {coco,yolo,folders,masks} SOURCE --output-dir REPO --config NAME``: add one converted config split.
- ``convert {mvtec,magnetic_tile,ad_folders} SOURCE --output-dir REPO --config NAME_ad``: add an anomaly-detection
  config (normal-only train; validation / test with normal and anomalous images and 0/1/255 masks).
- ``synthesize NORMAL_DIR --output-dir REPO --config NAME --counts anomaly=N,...``: add synthetic defects.
- ``push REPO --repo-id ORG/NAME``: upload a repo folder to the Hub.

Modules: ``taxonomy`` (+ ``taxonomy.yaml``), ``schema`` (features per task), ``mapping``, ``images``
(reading and cleaning), ``pipeline`` (mapping, cleaning, writing), ``converters``, ``writer`` (Parquet
shards), ``card`` (README), ``report`` (validation report), ``synthetic``, ``procedural``, ``raster``.
"""
