"""Reading a committed cache: the plain reader (every field, checked), and the training hot path
(``fast_reader``: shard rows straight from the files, many samples per read)."""
