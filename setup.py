from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="delivery",
    version="0.1.0",
    description="Reliable event delivery to Matrix application services, on Twisted",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # twisted/plugins holds the twistd plugin (no __init__.py: it extends Twisted's own)
    packages=[*find_packages(include=["delivery", "delivery.*"]), "twisted.plugins"],
    package_data={"delivery": ["py.typed"], "twisted.plugins": ["delivery_plugin.py"]},
    entry_points={"console_scripts": ["delivery = delivery.cli:main"]},
    install_requires=[
        "twisted>=24.7",
        "treq>=24.9",
        "txpostgres>=1.7",
        "psycopg2-binary>=2.9",
        "attrs>=23.1",
        "automat>=24.8",
        "pyyaml>=6.0",
        "prometheus-client>=0.20",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "hypothesis>=6.100",
            "mautrix>=0.20",
            "aiohttp>=3.9",
            "schemathesis>=4",
            "jsonschema>=4.18",
            "matplotlib>=3.8",
        ],
        # scripts/bench --plot
        "bench": ["matplotlib>=3.8"],
    },
)
