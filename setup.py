"""Package discovery that pyproject.toml cannot express: operator/ installs as consortium_operator."""
from setuptools import find_packages, setup

packages = find_packages(include=["consortium", "consortium.*", "node_agent", "node_agent.*"])
packages += ["consortium_operator" + name[len("operator"):]
             for name in find_packages(include=["operator", "operator.*"])]
setup(packages=packages)
