"""Which packages the wheel holds; everything else about the project is in pyproject.toml.

Every package under medx/ is found automatically, and the configs at the top of the checkout
(conf/, each folder a config group) ship inside the package as medx/conf, where
`medx.config.config_dir()` finds them. pyproject.toml alone cannot combine automatic
discovery with a folder mapped into the package.
"""

from setuptools import find_namespace_packages, find_packages, setup

CONF = ["medx.conf", *(f"medx.conf.{group}" for group in find_namespace_packages(where="conf"))]

setup(
    packages=[*find_packages(include=["medx", "medx.*"]), *CONF],
    package_dir={"medx.conf": "conf"},
    package_data={package: ["*.yaml"] for package in CONF},
)
