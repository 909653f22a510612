"""Files the stages hand each other: checkpoints, the run directory's layout, released weight and statistics
files (read without running code in them), and image grids."""
