"""The package list, found from the folders (everything else is in pyproject.toml).

pyproject.toml maps `recipes/` to `swiftkv_train.recipes` and `kernels/` to `swiftkv_kernels`, and setuptools'
automatic discovery does not follow such a mapping; so the packages are found here, folder by folder, and a new
method's folder (swiftkv_train/methods/<name>/) is installed with no edit to any packaging file. Data-only folders
(recipe groups, the shipped GSM8K subset) count as packages so that their files are installed.
"""

from setuptools import find_namespace_packages, setup

SKIP = ["*__pycache__*", "recipes", "recipes.*"]  # swiftkv_train/recipes exists only as a link in some checkouts


def packages_in(folder: str, prefix: str) -> list[str]:
    return [prefix, *(f"{prefix}.{name}" for name in find_namespace_packages(where=folder, exclude=SKIP))]


setup(packages=[*packages_in("swiftkv_train", "swiftkv_train"), *packages_in("recipes", "swiftkv_train.recipes"),
                "swiftkv_kernels"])
