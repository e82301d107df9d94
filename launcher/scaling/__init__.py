"""Scaling benchmarks: the report over a sweep directory, its arithmetic, its plots, and the environment fingerprint.

Login-node code: stdlib only at import time (matplotlib is imported inside ``plots``; torch only inside
``fingerprint.collect_fingerprint``, which runs in the job). See docs/scaling.md.

    python -m launcher.scaling report runs/ --tokens 2e11
"""

# Nothing is imported here: the job imports launcher.scaling.fingerprint alone and must not pay for the report's
# modules (report.py lists them).
