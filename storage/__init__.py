"""storage: NIfTI archives -> chunked Zarr v3 volume stores, catalog and torch samplers."""
