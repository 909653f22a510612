"""What every reader and writer of a cache agrees on: the file layout, the manifest and its fingerprint, the
int8 codec, the source records, the integrity checks and the sizes of a sample. Depends on ``storage`` only."""
