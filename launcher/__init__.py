"""HPC training launcher for EuroHPC machines (LUMI, Leonardo) and local runs.

The login-node path (config, planning, rendering, submission, status) imports no torch, transformers or
deepspeed; ``launcher.train`` is the only package that does, and only inside the job.
"""

__version__ = "0.1.0"
