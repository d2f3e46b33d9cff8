"""On-disk formats, one module each."""
