"""A tiny random-weight FLUX.1 pipeline and LoRAs for it, built fully offline.

The pipeline has FLUX.1-dev's structure (guidance embedding, double and single blocks with every linear
layer a FLUX LoRA targets, CLIP + T5 text encoders, a 2-D VAE, the flow-matching scheduler) at toy widths, so
that `FluxPipeline.from_pretrained(directory)` and `load_lora_weights(path)` run the real diffusers code paths
on CPU in well under a second per image. Both tokenizers are trained here on a handful of sentences with
`tokenizers`: nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

CORPUS = (
    "How2Draw a cat sitting on a chair, simple pencil sketch, step by step.",
    "How2Draw a red fox jumping over a log in the forest at dawn.",
    "How2Draw an old lighthouse on a rocky coast with waves and seagulls.",
    "How2Draw a bowl of fruit: apples, pears, grapes and a banana.",
    "A watercolor painting of a mountain lake under a pale blue sky.",
    "A photo of a dog wearing sunglasses, studio lighting, 35mm.",
    "A tiny robot reading a book in a library, warm light, detailed.",
    "An astronaut riding a horse on the moon, digital art, 4k.",
)
"""Sentences the tokenizers are trained on (prompts outside it still tokenize, as sub-words or unknowns)."""

TEXT_WIDTH = 32
"""Width of both text encoders' hidden states (CLIP pooled output and T5 sequence)."""

CLIP_MAX_TOKENS = 77
T5_MAX_TOKENS = 512

TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 16,  # 2x2 packed patches of 4 latent channels
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": TEXT_WIDTH,
    "pooled_projection_dim": TEXT_WIDTH,
    "guidance_embeds": True,  # like FLUX.1-dev: guidance_scale is an input of the transformer
    "axes_dims_rope": (4, 4, 8),  # sums to attention_head_dim
}

VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (8, 16),  # two blocks: 2x downsampling, pixel sizes must be multiples of 4
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 32,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.1159,
    "scaling_factor": 0.3611,
}

SCHEDULER_CONFIG = {  # FLUX.1-dev's scheduler settings
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
"""CLIP's word splitter, the same one `transformers.CLIPTokenizer` builds."""

KOHYA_DOUBLE_BLOCK = {
    # kohya/BFL module -> the diffusers modules its rows split into (in order)
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
"""BFL names of a double block's linear layers. Single blocks are left out of the kohya variant: diffusers
0.42.1 splits a single block's fused `linear1` with FLUX.1's hard-coded widths (3072, 3072, 3072, 12288),
which a tiny transformer cannot match."""


def _train_clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE with CLIP's normalizer, word splitter and `</w>` word ends, trained on CORPUS."""
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(merge) for merge in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=CLIP_MAX_TOKENS)


def _train_t5_tokenizer() -> T5Tokenizer:
    """A sentencepiece-style Unigram model with T5's ids (<pad> 0, </s> 1, <unk> 2), trained on CORPUS."""
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    unigram.train_from_iterator(CORPUS, trainer)
    vocab = [(piece, score) for piece, score in json.loads(unigram.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_TOKENS)


def build_tiny_flux(directory: Path, seed: int = 0) -> Path:
    """Build a tiny random `FluxPipeline` seeded with `seed`, `save_pretrained` it to `directory`; return it.

    Image sizes must be multiples of 4 pixels (16 is the real model's rule and works too); 32x32 with 2 steps
    renders in a fraction of a second on CPU.
    """
    tokenizer = _train_clip_tokenizer()
    tokenizer_2 = _train_t5_tokenizer()
    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_MAX_TOKENS,
            projection_dim=TEXT_WIDTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=TEXT_WIDTH,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=AutoencoderKL(**VAE_CONFIG),
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=FluxTransformer2DModel(**TRANSFORMER_CONFIG),
    )
    directory = Path(directory)
    pipe.save_pretrained(directory)
    return directory


def block_linears(transformer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every `nn.Linear` inside the transformer's double and single blocks, by module name.

    Works after LoRAs are loaded too: PEFT's wrapped layer counts under its own name, its factors do not.
    """
    linears = {}
    for name, module in transformer.named_modules():
        base_name = name.removesuffix(".base_layer")
        if (
            isinstance(module, torch.nn.Linear)
            and base_name.startswith(("transformer_blocks.", "single_transformer_blocks."))
            and ".lora_" not in base_name
        ):
            linears[base_name] = module
    return linears


def _decaying_pair(
    out_features: int, in_features: int, rank: int, scale: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random factors A `[rank, in]`, B `[out, rank]` whose delta B @ A has entries of about scale / sqrt(in).

    Component i is weighted by 0.6**i, so the spectrum decays like a trained LoRA's: cutting the rank keeps
    most of the delta but not all of it.
    """
    weights = 0.6 ** torch.arange(rank, dtype=torch.float32)
    down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
    up = torch.randn(out_features, rank, generator=generator) * weights * scale / weights.norm()
    return down, up


def tiny_flux_lora(transformer: torch.nn.Module, rank: int, seed: int, scale: float = 3.0) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT-layout LoRA over every block linear of `transformer`, fp32, scale 1 (no alpha).

    Keys `transformer.<module>.lora_A.weight` `[rank, in]` and `.lora_B.weight` `[out, rank]`. With the
    default `scale` the rendered image changes clearly against the base model.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, linear in block_linears(transformer).items():
        down, up = _decaying_pair(linear.out_features, linear.in_features, rank, scale, generator)
        state[f"transformer.{name}.lora_A.weight"] = down
        state[f"transformer.{name}.lora_B.weight"] = up
    return state


def tiny_flux_kohya_lora(
    transformer: torch.nn.Module, rank: int, seed: int, scale: float = 3.0, alpha: float = 1.0
) -> dict[str, torch.Tensor]:
    """A kohya sd-scripts-layout LoRA over every double-block linear, with BFL names and fused qkv, fp32.

    Keys `lora_unet_double_blocks_<i>_<module>.lora_down.weight` `[rank, in]`, `.lora_up.weight` `[out, rank]`
    (fused qkv: out = 3 x width) and a 0-dim `.alpha`; the delta is (alpha / rank) * up @ down, with entries
    of about scale / sqrt(in) whatever `alpha` is.
    """
    generator = torch.Generator().manual_seed(seed)
    linears = block_linears(transformer)
    state = {}
    for index in range(len(transformer.transformer_blocks)):
        for bfl_name, parts in KOHYA_DOUBLE_BLOCK.items():
            part_linears = [linears[f"transformer_blocks.{index}.{part}"] for part in parts]
            out_features = sum(linear.out_features for linear in part_linears)
            down, up = _decaying_pair(out_features, part_linears[0].in_features, rank, scale, generator)
            key = f"lora_unet_double_blocks_{index}_{bfl_name}"
            state[f"{key}.lora_down.weight"] = down
            state[f"{key}.lora_up.weight"] = up * (rank / alpha)
            state[f"{key}.alpha"] = torch.tensor(float(alpha))
    return state


def load_tiny_flux(directory: Path) -> FluxPipeline:
    """Load a pipeline saved by `build_tiny_flux`, fp32 on CPU."""
    return FluxPipeline.from_pretrained(directory, dtype=torch.float32)
