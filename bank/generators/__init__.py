"""Registered generators, one file each (importing this package registers them)."""

from bank.generators import layerdiffuse, procedural, sd3, sd15, sd15_random, tiny_sd  # noqa: F401
from bank.generators.base import GENERATORS, Generated, Generator, GeneratorSettings, Request, create_generator

__all__ = ["GENERATORS", "Generated", "Generator", "GeneratorSettings", "Request", "create_generator"]
