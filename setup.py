"""Package layout that pyproject.toml cannot express: the top-level `model_cards/` folder of card templates
installs as the `hf_moso.model_cards` package. All other metadata is in pyproject.toml."""

from setuptools import find_packages, setup


setup(
    packages=find_packages(include=["hf_moso", "hf_moso.*"]) + ["hf_moso.model_cards"],
    package_dir={"hf_moso.model_cards": "model_cards"},
    package_data={"hf_moso.model_cards": ["*.md"]},
)
