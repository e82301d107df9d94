"""Kept for jobs queued before the move to ``launcher.slurm.task``: submitit pickled ``train_task`` of this module
by name, and a requeued attempt unpickles it against the current checkout. Delete after one release."""

from launcher.slurm.task import train_task  # noqa: F401
