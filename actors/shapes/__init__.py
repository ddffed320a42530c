"""The synthetic shapes world: a bundled multimodal dataset that needs no download.

Images of coloured shapes on a 3x3 grid, with captions, VQA, POPE-style probes and preference pairs,
plus per-cell labels so a vision encoder can be pretrained on it in seconds.
"""
from actors.shapes.vocab import COLOURS, POSITIONS, SHAPES, SIZES
from actors.shapes.world import Obj, Scene, WorldConfig, render, sample_scene

__all__ = ["COLOURS", "POSITIONS", "SHAPES", "SIZES", "Obj", "Scene", "WorldConfig", "render", "sample_scene"]
