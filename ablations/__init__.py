"""Paper-table grids run through submitit (SLURM, local, debug) and their result tables."""
