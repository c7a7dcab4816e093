"""Build script: pure-Python package; the CUDA extension in csrc/ is added by the cuda backend work."""
from setuptools import setup

setup()
