"""What an operator runs on a cache: ``verify`` (every byte against its checksum) and ``info`` (what it holds)."""
