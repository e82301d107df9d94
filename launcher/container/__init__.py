"""Tasks inside an Apptainer/Singularity image, and the image itself (recipes in containers/, docs/containers.md).

Stdlib only at import; nothing here imports torch. Where each part runs:

- ``exec``: on the login node, while rendering the batch script: the srun payload that starts the container's python
  (``command_prefix``) and the setup lines that forward the job's environment and binds (``batch_setup_lines``).
- ``recipe``: reading the definition files of containers/ (the build and the tests).
- ``build``: the image build command of each machine, printed or run (login node; a Slurm job on Leonardo).
- ``check``: inside the image (the recipes' %test): installed versions against pyproject.toml's ranges.
- ``cli``: ``python -m launcher.container build|check``.
"""

# Only exec here: rendering every batch script imports this package, and cli pulls in build and recipe parsing.
from launcher.container.exec import batch_setup_lines, command_prefix

__all__ = ["batch_setup_lines", "command_prefix"]
