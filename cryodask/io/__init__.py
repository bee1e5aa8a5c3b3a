"""Reading and writing the ecosystem's formats: MRC (``mrc``), TIFF (``tiff``), OME-Zarr
(``omezarr``), STAR/CSV coordinates (``picks``), and any volume file (``volumes``).

Submodules are imported where used: workers that only read MRC and write zarr then never
load pandas or ome-zarr (about 160 MB of resident memory per worker).
"""
