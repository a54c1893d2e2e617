"""Locations (data/storage.py): local paths stay pathlib paths, URIs keep their query for the
next process, and a URI carrying credentials is refused with one line (exit 2 from the CLI),
before any filesystem is made from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from morec_dist.cli import main
from morec_dist.data import storage


def test_local_paths_stay_paths(tmp_path):
    assert storage.location(str(tmp_path / "ds")) == (tmp_path / "ds").resolve()
    assert storage.location(f"file://{tmp_path}/ds") == tmp_path / "ds"
    assert isinstance(storage.location(Path("rel")), Path) and not storage.is_uri(Path("s3://x"))


@pytest.mark.parametrize(
    "uri", ["s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/ds", "s3://bucket/ds?region=x&secret_key=wJalrXUtnFEMI"]
)
def test_credentials_in_a_uri_are_refused(uri, capsys):
    with pytest.raises(storage.StorageError, match="carries credentials"):
        storage.location(uri)
    assert main(["inspect", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s3://bucket/ds" in err[0] and "environment" in err[0], err
    assert "wJalrXUtnFEMI" not in err[0]
