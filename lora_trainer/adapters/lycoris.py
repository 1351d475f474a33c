"""LoKr and LoHa (``network_type``): PEFT's LoKrConfig / LoHaConfig, chosen over the lycoris-lora package.

PEFT injects them through the same ``add_adapter`` / ``inject_adapter_in_model`` path as LoRA and reads and writes
them with ``get_peft_model_state_dict`` / ``set_peft_model_state_dict``, so checkpoints, resume (bitwise), sharded
state, init_lora and the validation model all stay one code path; its factor shapes and factorisation rule are
LyCORIS's (same ``factorization``, same "decompose w2 when rank < max(dim)/2"), so the exported factors are exactly
what ComfyUI, Forge and A1111 reconstruct. lycoris-lora would wrap the model in a second network object with its own
save / load and optimizer params, beside PEFT's for LoRA. The one difference, PEFT scaling alpha / rank where
LyCORIS uses 1 when no factor is decomposed, is baked into the exported factors (outputs/lycoris.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ALGOS = ("lokr", "loha")
# PEFT's names for their tensors (its layers' adapter_layer_names), which are also LyCORIS's file suffixes
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
PARTS = LOKR_PARTS + LOHA_PARTS
# The factor a scale is folded into (one per module, the first it has): the exports and init_lora agree on it.
FIRST_FACTORS = ("lokr_w1", "lokr_w1_a", "hada_w1_a")


@dataclass(frozen=True)
class Network:
    type: str = "lora"  # lora | lokr | loha
    factor: int = -1
    decompose_both: bool = False
    effective_conv: bool = False

    @classmethod
    def of(cls, cfg: Any) -> "Network":
        return cls(cfg.network_type, cfg.lokr_factor, cfg.lokr_decompose_both, cfg.lycoris_effective_conv)

    @property
    def lycoris(self) -> bool:
        return self.type in ALGOS

    def peft_config(self, *, rank: int, alpha: float, dropout: float, targets: list[str]):
        """PEFT's config for the target modules; ``dropout`` is PEFT's rank dropout (LoKr / LoHa have no input
        dropout), unscaled as LyCORIS's default."""
        from peft import LoHaConfig, LoKrConfig

        common = dict(r=rank, alpha=alpha, rank_dropout=dropout, module_dropout=0.0, target_modules=targets,
                      use_effective_conv2d=self.effective_conv, init_weights=True)
        if self.type == "lokr":
            return LoKrConfig(decompose_both=self.decompose_both, decompose_factor=self.factor, **common)
        return LoHaConfig(**common)

    def network_args(self, *, dropout: float) -> dict[str, str]:
        """``ss_network_args`` as sd-scripts writes LyCORIS's ``--network_args`` (every value a string)."""
        args = {"algo": self.type, "dropout": "0.0", "rank_dropout": str(float(dropout)),
                "use_tucker": str(self.effective_conv)}
        if self.type == "lokr":
            args.update(factor=str(self.factor), decompose_both=str(self.decompose_both))
        return args

    def label(self) -> str:
        return {"lora": "LoRA", "lokr": "LoKr", "loha": "LoHa"}[self.type]
