"""Packaging for cloudmanager. Metadata lives here; pyproject.toml names the build backend."""

from setuptools import find_packages, setup

setup(
    name="cloudmanager",
    version="0.3.0",
    description="A pool of files kept on several hosts, addressed by SHA-256, "
                "with a bounded local LRU cache",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["cloudmanager", "cloudmanager.*"]),
    package_data={"cloudmanager.db": ["schema.sql", "schema_postgres.sql"]},
    install_requires=[
        "plowshare>=0.3.6",  # plowshare-wrapper: the plowup/plowdown adapter
        "tomli>=1.1; python_version < '3.11'",  # cloudmanager.toml; 3.11+ has tomllib
        # The `cm` command: parsing, progress bars and tables, per-user dirs.
        "click>=8.1", "rich>=13", "platformdirs>=3",
    ],
    extras_require={
        # Optional host kinds, imported only when a spec needs them.
        "s3": ["boto3>=1.34"],
        "fsspec": ["fsspec>=2023.1"],
        "webdav": ["fsspec>=2023.1", "webdav4>=0.9"],
        "sftp": ["fsspec>=2023.1", "paramiko>=3"],
        # Copies encrypted on the client, in the age format.
        "encryption": ["pyrage>=1.2"],
        # A catalog shared by several nodes on a PostgreSQL server.
        "postgres": ["psycopg[binary]>=3.1", "psycopg-pool>=3.2"],
        # Baselines the benchmarks in bench/ measure us against.
        "bench": ["diskcache>=5.6"],
        "develop": [
            "pytest>=7", "tox>=4", "hypothesis>=6.100", "diskcache>=5.6",
            # Real servers on loopback for the host tests: S3 and WebDAV.
            "boto3>=1.34", "moto[server]>=5", "fsspec>=2023.1", "webdav4>=0.9",
            "wsgidav>=4", "cheroot>=10",
            # The catalog suite on a real PostgreSQL server (its binaries come
            # from the system: Debian's postgresql package).
            "psycopg[binary]>=3.1", "psycopg-pool>=3.2",
            # Encryption, checked against the system's `age` command.
            "pyrage>=1.2",
            # Lint, run by tox's lint environment.
            "ruff>=0.6", "mypy>=1.10",
        ],
    },
    entry_points={"console_scripts": [
        "cm=cloudmanager.cli:main",
        "cm_setup_db=cloudmanager.setup_db:main",
    ]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "License :: OSI Approved :: MIT License",
        "Operating System :: POSIX",
        "Topic :: System :: Archiving :: Backup",
    ],
)
