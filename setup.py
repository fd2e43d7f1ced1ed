"""The one C extension (everything else is in pyproject.toml): srcid.service._bodyjson, the parser of request bodies
with listed features (srcid/service/bodies.py). Building it needs a C compiler and Python's headers."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("srcid.service._bodyjson", ["srcid/service/_bodyjson.c"])])
