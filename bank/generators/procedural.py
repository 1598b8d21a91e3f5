"""`procedural`: renders the synthetic benchmark's categories (dpseg.data.shapes) — no model,
instant; the offline demo's generator."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bank.generators.base import GENERATORS, Generated, Generator, GeneratorSettings, Request, pick


@GENERATORS.register("procedural")
class ProceduralGenerator(Generator):
    id = "procedural"
    defaults = {"resolution": 64}

    @classmethod
    def create(cls, options: GeneratorSettings):
        resolution = pick(options.resolution, cls.defaults["resolution"])
        return cls(
            {"renderer": "dpseg.data.shapes/v1", "resolution": resolution},
            {"device": "cpu", "dtype": "uint8", "compile": []},
        )

    def generate(self, requests: Sequence[Request]) -> Generated:
        from dpseg.data.shapes import render_prompt_image

        size = self.settings["resolution"]
        look = self.settings.get("look", "scene")
        arrays = [render_prompt_image(r.category, r.template, size, r.seed % 2**32, look) for r in requests]
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        return Generated(images=images)


@GENERATORS.register("procedural-studio")
class StudioGenerator(ProceduralGenerator):
    """The same categories with a generated look the scenes never have: a flat studio backdrop,
    the object centred and whole (paired with `scene_style: photo` scenes, a generator gap like
    the paper's between diffusion images and photographs)."""

    id = "procedural-studio"

    @classmethod
    def create(cls, options: GeneratorSettings):
        resolution = pick(options.resolution, cls.defaults["resolution"])
        return cls(
            {"renderer": "dpseg.data.shapes/v1", "resolution": resolution, "look": "studio"},
            {"device": "cpu", "dtype": "uint8", "compile": []},
        )
