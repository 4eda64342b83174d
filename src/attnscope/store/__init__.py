"""Attention archive: chunked Zarr v3 / HDF5 store behind one interface."""
