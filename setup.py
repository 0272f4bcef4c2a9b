"""Which packages the wheel holds; everything else about the project is in pyproject.toml.

Every package under medx/ is found automatically, and the configs at the top of the checkout
(conf/) ship inside the package as medx/conf, where `medx.config.config_dir()` finds them.
pyproject.toml alone cannot combine automatic discovery with a folder mapped into the package.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["medx", "medx.*"]), "medx.conf"],
    package_dir={"medx.conf": "conf"},
)
