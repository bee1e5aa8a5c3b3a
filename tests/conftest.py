"""Shared fixtures: one real ``distributed.LocalCluster`` for the session, and test files."""

from __future__ import annotations

import logging
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from hypothesis import settings

# property tests check results, not speed: a loaded 2-core CI machine must not fail them on time
settings.register_profile("cryodask", deadline=None)
settings.load_profile("cryodask")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="3GB",
                      silence_logs=logging.CRITICAL, dashboard_address=":0") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def client(cluster):
    from distributed import Client

    with Client(cluster) as client:
        yield client


@pytest.fixture
def data_dir():
    if not DATA.exists():
        pytest.skip(f"real data not found at {DATA}")
    return DATA


def write_raw_mrc(path, data, voxel_size=10.0):
    """An MRC file written by mrcfile itself (not by cryodask), as other tools would."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(data))
        mrc.voxel_size = voxel_size
    return Path(path)


def one_line_error(call, path, match):
    """``call()`` raises an InputError of one line, naming ``path`` first and matching ``match``."""
    from cryodask.errors import InputError

    with pytest.raises(InputError, match=match) as info:
        call()
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    return message
