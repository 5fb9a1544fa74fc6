"""The shipped topology files (*.yaml) and chip types (chips/*.yaml), installed as the package
ncl.topology.shipped (pyproject.toml maps it to this folder) so that every kind of install finds them."""
