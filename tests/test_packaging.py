"""Packaging: what an install carries.  The shipped topologies stay at the top of the checkout (topology/) and
install as the package ncl.topology.shipped.  A non-editable install once missed them (they were looked up three
folders above the module); these tests read pyproject.toml, so they catch a missing package or glob without
building a wheel, and check that the installed ncl finds its files through the package."""
import glob
import importlib.util
import os

import pytest

from ncl.topology import schema
from ncl.topology.core import load_topology

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = "ncl.topology.shipped"


def _setuptools() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def test_every_package_under_ncl_is_listed():
    on_disk = {os.path.relpath(root, REPO).replace(os.sep, ".")
               for root, _, files in os.walk(os.path.join(REPO, "ncl")) if "__init__.py" in files}
    missing = on_disk - set(_setuptools()["packages"])
    assert not missing, f"add {', '.join(sorted(missing))} to [tool.setuptools] packages in pyproject.toml"


def test_every_shipped_topology_file_is_package_data():
    cfg = _setuptools()
    assert SHIPPED in cfg["packages"]
    folder = os.path.join(REPO, cfg["package-dir"][SHIPPED])
    assert os.path.isfile(os.path.join(folder, "__init__.py")), f"{folder} must be a package to be found by name"
    files = {os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, "**", "*.yaml"), recursive=True)}
    assert {"pcie-gen5-8card.yaml", os.path.join("chips", "rngd.yaml")} <= files
    shipped = {f for pattern in cfg["package-data"][SHIPPED] for f in glob.glob(pattern, root_dir=folder)}
    assert files <= shipped, f"not package data (pyproject's globs miss them): {sorted(files - shipped)}"


def test_the_installed_ncl_finds_its_topologies_through_the_package():
    spec = importlib.util.find_spec(SHIPPED)
    if spec is None:
        import ncl
        if os.path.abspath(ncl.__file__).startswith(os.path.join(REPO, "")):
            pytest.skip(f"ncl runs from this checkout, installed before pyproject mapped {SHIPPED} (or not installed): "
                        "`pip install -e .` again")
        pytest.fail(f"the installed ncl ({ncl.__file__}) has no {SHIPPED}: its topology files are missing")
    folder = os.path.abspath(list(spec.submodule_search_locations)[0])
    assert schema.SHIPPED_DIR == folder
    assert schema.CHIPS_DIR == os.path.join(folder, "chips")
    assert "pcie-gen5-8card" in schema.shipped_names()
    assert "rngd" in schema.shipped_chip_types()
    assert load_topology("hgx-h200-8gpu").num_chips == 8


def test_a_missing_topology_folder_is_named_in_the_error(monkeypatch, tmp_path):
    monkeypatch.setattr(schema, "SHIPPED_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="holds no shipped topologies"):
        schema.resolve("pcie-gen5-8card")
