"""Serving artefacts from a trained checkpoint (``morec export``) and evaluation through them
(``morec evaluate --ann``).

An export directory holds the item vectors (Parquet parts, streamed shard by shard by every
rank), the user side (MF: user vectors in Parquet; two-tower: the user tower through
``torch.export`` plus its feature spec), optionally a FAISS index over the item vectors,
and ``manifest.json`` (written last). Layout and manifest: ``layout.py``; the rank job:
``job.py``; the vectors: ``vectors.py``; the user side per model kind: ``user_side.py``;
the index: ``index.py``; evaluation through the index: ``ann.py``; an export at a
filesystem URI (staged locally, uploaded with the manifest last, read back through a
checked download): ``store.py``.

Layering: export imports model/, eval/, data/, distributed/ and train/ (checkpoint loading,
the runner's setup); nothing imports export except the CLI.
"""
