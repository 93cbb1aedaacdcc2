"""The C part of the package: gateway/web/_recorder.c (see gateway/web/recorder.py).

Optional: without a C compiler the install still succeeds, with a warning, and
the gateway records requests in Python (the same output, at about one and a
half times the cost per request). Everything else about the package is in
pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gateway.web._recorder",
            ["gateway/web/_recorder.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11"],
        )
    ]
)
