"""Where the bytes live: durable local writes and locks (``fsutil``), S3-compatible object storage
(``object_store``). Knows nothing of the cache's format."""
