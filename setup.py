"""Builds the Cython fast path into edgeproxy._fastpath; a failed compile fails the install."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "edgeproxy._fastpath",
        ["_fastpath/_fastpath.pyx"],
        extra_compile_args=["-O3"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    ),
)
