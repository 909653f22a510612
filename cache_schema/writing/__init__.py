"""Writing a cache: parts written and committed by the process that claimed them (leases with heartbeats,
on a local disk or on S3), and copying a finished cache to object storage (``push``)."""
