"""The one thing pyproject.toml cannot say: the checkout's notebooks/ ships inside the package, as
`vldlib/notebooks/` (wheel and sdist), so an installed vldlib runs its notebooks from any folder
(`vldlib.paths.find_notebook`). Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["vldlib", "vldlib.*"]), "vldlib.notebooks"],
    package_dir={"vldlib.notebooks": "notebooks"},  # data only: the notebooks and their parameter files
    package_data={"vldlib.notebooks": ["*.ipynb", "*.yaml", "*.csv"]},  # vldlib.paths.SHIPPED_SUFFIXES
)
