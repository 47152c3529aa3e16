"""Batch generation as a Ray job, a module per concern: rows.py (rows in and out, the output file), replica.py
(the engine replica actor), driver.py (the job: feeding replicas, writing rows, retries, resume), cli.py (flags).
The command is `python -m deployments.batch_job` (or `python -m deployments.batch`)."""
