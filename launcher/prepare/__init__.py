"""``python -m launcher.prepare``: tokenize a run's data once into the cache its training reads (docs/data.md).

Login-node modules (``caches``, ``slurm``, ``__main__``) import no torch or transformers; ``work`` is the
preparation itself and imports the training stack inside its functions.
"""
