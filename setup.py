# Minimal for now; the native (CMake/pybind11) build is added by the packaging work.
from setuptools import setup

setup()
