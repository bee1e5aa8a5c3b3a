"""Reading and writing the ecosystem's formats: MRC (``mrc``), TIFF (``tiff``), OME-Zarr
(``omezarr``), STAR/CSV coordinates (``picks``), any volume file (``volumes``), and the
intensity normalisations fixed by one pass over a volume (``normalize``).

Submodules are imported where used: workers that only read MRC and write zarr then never
load pandas or ome-zarr (about 160 MB of resident memory per worker).
"""
