"""Tiny Nemotron-H checkpoints with a multi-token prediction (MTP) head, in Nemotron 3 Super's layout.

transformers 5.23 builds no MTP head (it drops `mtp.*` weights on load), so the main model is
written by `nemotron_fixtures.write_checkpoint` and the head is added after it, as NVIDIA ships
it: `num_nextn_predict_layers` and `mtp_hybrid_override_pattern` in config.json, and the
`mtp.layers.{i}.*` tensors in a second shard listed by an index. Each MTP sublayer's own weights
(`norm`, `mixer.*`) are a main-stack layer of the same kind taken from another seeded transformers
model, renamed; so their names and shapes come from transformers, not from plait, and that model's
blocks compute the reference (`MTPReference`).
"""

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.nemotron_fixtures import CONFIGS, hf_config, reinitialise, write_checkpoint

KIND = "moe"
"""The main model's config: its pattern has a layer of every kind to take sublayers from."""

MAIN_PATTERN = CONFIGS[KIND]["hybrid_override_pattern"]


@dataclass
class MTPReference:
    """The MTP head computed with transformers' own blocks and norms (no cache)."""

    directory: Path
    main: torch.nn.Module  # the transformers NemotronHForCausalLM written to the directory
    donors: list[torch.nn.Module]  # per MTP layer, the transformers model its sublayers come from
    tensors: dict[str, torch.Tensor]  # mtp.* tensors as written, without the file's prefix
    pattern: str

    def norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHRMSNorm

        norm = NemotronHRMSNorm(x.shape[-1], self.main.config.layer_norm_epsilon)
        norm.weight.data.copy_(self.tensors[name])
        return norm(x)

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The main model's last hidden states (after norm_f), [B, T, H]."""
        return self.main.model(ids).last_hidden_state

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, step: int = 0):
        """(logits, MTP hidden states) of one draft step over every position."""
        depth = step % len(self.donors)
        first = depth * len(self.pattern)
        last = first + len(self.pattern) - 1
        embeds = self.main.model.embeddings(next_ids)
        fused = torch.cat(
            [
                self.norm(f"mtp.layers.{first}.enorm.weight", embeds),
                self.norm(f"mtp.layers.{first}.hnorm.weight", hidden),
            ],
            dim=-1,
        )
        x = fused @ self.tensors[f"mtp.layers.{first}.eh_proj.weight"].T
        for symbol in self.pattern:
            x = self.donors[depth].model.layers[MAIN_PATTERN.index(symbol)](x)
        x = self.norm(f"mtp.layers.{last}.final_layernorm.weight", x)
        return self.main.lm_head(x), x


def _saved_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A transformers model's tensors under the names `save_pretrained` writes."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return load_file(Path(tmp) / "model.safetensors")


def write_mtp_checkpoint(
    directory: Path, pattern: str = "*E", seed: int = 0, depth: int = 1, prefix: str = ""
) -> MTPReference:
    """Write a tiny checkpoint with `depth` MTP layers of sublayers `pattern` (symbols M * - E)
    to `directory`; `prefix` (e.g. "language_model.") goes in front of every weight name, as in
    multimodal checkpoints. Deterministic per seed."""
    from transformers import NemotronHForCausalLM as HFModel

    main = write_checkpoint(directory, KIND, seed=seed)
    g = torch.Generator().manual_seed(seed)
    hidden_size = main.config.hidden_size
    tensors: dict[str, torch.Tensor] = {}
    donors = []
    for d in range(depth):
        donor = HFModel(hf_config(KIND)).float().eval()
        reinitialise(donor, seed + 1 + d)
        donors.append(donor)
        saved = _saved_tensors(donor)
        for j, symbol in enumerate(pattern):
            layer = f"mtp.layers.{d * len(pattern) + j}"
            source = f"backbone.layers.{MAIN_PATTERN.index(symbol)}."
            tensors |= {
                f"{layer}.{k.removeprefix(source)}": v for k, v in saved.items() if k.startswith(source)
            }
            if j == 0:
                tensors[f"{layer}.enorm.weight"] = 1.0 + 0.2 * torch.randn(hidden_size, generator=g)
                tensors[f"{layer}.hnorm.weight"] = 1.0 + 0.2 * torch.randn(hidden_size, generator=g)
                eh_proj = torch.randn(hidden_size, 2 * hidden_size, generator=g) / math.sqrt(2 * hidden_size)
                tensors[f"{layer}.eh_proj.weight"] = eh_proj
            if j == len(pattern) - 1:
                tensors[f"{layer}.final_layernorm.weight"] = 1.0 + 0.2 * torch.randn(hidden_size, generator=g)

    shards = {
        "model.safetensors": load_file(directory / "model.safetensors"),
        "model-mtp.safetensors": tensors,
    }
    weight_map = {}
    for file, shard in shards.items():
        save_file({prefix + k: v.contiguous() for k, v in shard.items()}, directory / file)
        weight_map |= {prefix + k: file for k in shard}
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))

    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("mtp_layers_block_type", None)  # transformers' default list; NVIDIA writes the pattern
    config |= {"num_nextn_predict_layers": depth, "mtp_hybrid_override_pattern": pattern}
    config_file.write_text(json.dumps(config, indent=2))
    return MTPReference(directory, main, donors, tensors, pattern)
