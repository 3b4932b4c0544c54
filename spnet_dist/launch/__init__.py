"""SLURM launching through submitit: `spnet submit` and `spnet jobs`.

- ``profile``: site profiles (configs/cluster/<name>.yaml) and ``cluster.<key>=value`` overrides
- ``task``: what runs in every SLURM task (torch.distributed env from the job, the `spnet train` entry,
  requeue after a preemption/timeout checkpoint)
- ``submit``: sweeps, the per-job folders, the submitit executor, the job index
- ``jobs``: the job index, job states from squeue/scontrol and submitit's files
"""
