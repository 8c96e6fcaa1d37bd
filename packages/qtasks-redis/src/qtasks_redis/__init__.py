"""Redis broker, storage and global config for qtasks."""
