"""The training stack, run inside the job: the only package that imports torch, transformers and deepspeed."""
