"""Baichuan2-7B/13B research plugin for MindSpore + MindFormers.

The model code lives in ``research/baichuan2`` as flat modules (``baichuan2_7b``,
``baichuan2_13b``, ...), as in the original MindFormers research folder, so that
``from baichuan2_7b import Baichuan7BV2ForCausalLM`` works both from that folder
and, after ``pip install -e .``, from anywhere.
"""
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join("research", "baichuan2")


def _requirements():
    with open(os.path.join(HERE, "requirements.txt"), encoding="utf-8") as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def _modules():
    return sorted(name[:-3] for name in os.listdir(os.path.join(HERE, SRC))
                  if name.startswith("baichuan2_") and name.endswith(".py"))


setup(
    name="baichuan2-mindformers",
    version="0.1.0",
    description="Baichuan2-7B/13B for MindSpore + MindFormers (research plugin), CPU-tested",
    python_requires=">=3.9,<3.12",
    package_dir={"": SRC},
    py_modules=_modules(),
    install_requires=_requirements(),
)
