"""qvd: a Linux VDI server stack (L7R, HKD, VMA, admin) on Twisted."""
from setuptools import find_packages, setup

setup(
    name="qvd",
    version="0.1.0",
    description="Linux VDI server stack, wire-compatible with QVD clients",
    python_requires=">=3.11",
    packages=find_packages(exclude=["tests", "tests.*"]) + ["twisted.plugins"],
    package_data={
        "qvd.db": ["migrations/*.sql"],
        "qvd.config": ["defaults/*.conf"],
        "qvd.virt": ["lxc.conf.template", "lxc.seccomp"],
    },
    install_requires=[
        "Twisted", "pyOpenSSL", "service_identity", "txpostgres", "psycopg2",
        "attrs", "zope.interface", "Automat", "argon2-cffi",
    ],
    entry_points={
        "console_scripts": [
            "qvd-admin = qvd.admin.cli:main",
            "qvd-client = qvd.client.cli:main",
            "qvd-di = qvd.di.cli:main",
        ],
    },
)
