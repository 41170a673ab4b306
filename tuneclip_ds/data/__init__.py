"""Data: shard writing (``shards``), the synthetic corpus (``synthetic``), the training pipeline (``pipeline``).

Submodules are not imported here so that ``python -m tuneclip_ds.data.<module>`` runs cleanly.
"""
