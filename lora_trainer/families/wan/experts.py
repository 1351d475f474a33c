"""Wan 2.2 T2V-A14B's two experts, as data (torch-free): ``transformer`` denoises the high-noise steps (timestep
t >= boundary_ratio x 1000; T2V 0.875, model_index.json's ``boundary_ratio``), ``transformer_2`` the low-noise ones.
ai-toolkit, musubi-tuner and ComfyUI workflows call them high_noise / low_noise: so do train_experts and the files."""
from __future__ import annotations

from ..spec import Experts

A14B = "t2v-a14b"
SECOND_EXPERT = "transformer_2"
T2V_BOUNDARY = 0.875  # WanPipeline T2V-A14B's boundary_ratio (diffusers' Wan2.2-T2V-A14B-Diffusers model_index)
EXPERTS = Experts(groups=(("high_noise", "transformer"), ("low_noise", SECOND_EXPERT)), boundary=T2V_BOUNDARY)
