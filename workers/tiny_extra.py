"""Tiny random-weight models beyond SD 1.5: SDXL, text-to-video, adapters (LoRA, textual
inversion, VAE) and the helper models (safety checker, x4 upscaler, translator).

Each writer takes a target folder and a seed, is deterministic for the seed, and returns the path a
loader takes. They share the sizes of ``workers.tiny_parts``, so the adapters fit the tiny SD 1.5
and SDXL pipelines built with any seed.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

# Concrete module paths: through the package root, mypy resolves the dummy placeholder classes.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.models.unets.unet_3d_condition import UNet3DConditionModel
from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_synth import (
    TextToVideoSDPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_upscale import (
    StableDiffusionUpscalePipeline,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    GenerationConfig,
    MarianConfig,
    MarianMTModel,
    PreTrainedTokenizerFast,
)

from dreamq.registry import ModelFamily
from workers.tiny_parts import (
    SD_SCHEDULE,
    TEXT_HIDDEN_SIZE,
    byte_alphabet,
    seeded,
    tiny_text_config,
    tiny_tokenizer,
    tiny_unet,
    tiny_vae,
)

LORA_FILE_NAME = "pytorch_lora_weights.safetensors"
EMBEDDING_FILE_NAME = "learned_embeds.safetensors"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# SDXL's micro-conditioning: six time ids (original size, crop, target size), each embedded in
# addition_time_embed_dim, concatenated with the pooled text embedding of the second encoder.
_XL_TIME_EMBED_DIM = 8
_XL_POOLED_DIM = TEXT_HIDDEN_SIZE


# --- SDXL -------------------------------------------------------------------------------------


def _tiny_sdxl_unet() -> UNet2DConditionModel:
    # diffusers' own SDXL test dummy (tests/pipelines/stable_diffusion_xl).
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_XL_TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * _XL_TIME_EMBED_DIM + _XL_POOLED_DIM,
        # Both encoders' penultimate hidden states, concatenated.
        cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
    )


def build_tiny_sdxl(*, seed: int = 0) -> StableDiffusionXLPipeline:
    """The tiny SDXL pipeline in memory: two text encoders, a text_time UNet, Euler."""
    tokenizer = tiny_tokenizer()
    with seeded(seed):
        unet = _tiny_sdxl_unet()
        vae = tiny_vae()
        text_encoder = CLIPTextModel(tiny_text_config(len(tokenizer)))
        text_encoder_2 = CLIPTextModelWithProjection(
            tiny_text_config(len(tokenizer), projection_dim=_XL_POOLED_DIM)
        )
    # SDXL base's scheduler config.
    scheduler = EulerDiscreteScheduler(
        **SD_SCHEDULE, timestep_spacing="leading", interpolation_type="linear"
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


def write_tiny_sdxl(directory: Path, *, seed: int = 0) -> Path:
    """A StableDiffusionXLPipeline folder for ``from_pretrained(directory)``."""
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_sdxl(seed=seed).save_pretrained(directory, safe_serialization=True)
    return directory


# --- text to video ----------------------------------------------------------------------------


def write_tiny_video(directory: Path, *, seed: int = 0) -> Path:
    """A TextToVideoSDPipeline folder (ModelScope's layout: a UNet3DConditionModel)."""
    tokenizer = tiny_tokenizer()
    with seeded(seed):
        unet = UNet3DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
            cross_attention_dim=TEXT_HIDDEN_SIZE,
            attention_head_dim=8,
        )
        vae = tiny_vae()
        text_encoder = CLIPTextModel(tiny_text_config(len(tokenizer)))
    # ModelScope text-to-video-ms-1.7b's scheduler config.
    scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    pipe = TextToVideoSDPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    )
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


# --- adapters ---------------------------------------------------------------------------------


def write_tiny_lora(directory: Path, *, family: ModelFamily = "sd15", seed: int = 0) -> Path:
    """A LoRA (rank 4 on the attention projections) for the tiny ``sd15`` or ``sdxl`` UNet of any
    seed; returns the folder (``pytorch_lora_weights.safetensors``) for
    ``pipe.load_lora_weights(directory, adapter_name=...)``."""
    if family not in ("sd15", "sdxl"):
        raise ValueError(f"unknown LoRA family {family!r}; supported: 'sd15', 'sdxl'")
    with seeded(seed):
        # Only the shapes matter: the saved file holds the LoRA matrices alone.
        unet = tiny_unet() if family == "sd15" else _tiny_sdxl_unet()
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
        with torch.no_grad():
            for name, param in unet.named_parameters():
                # peft starts lora_B at zero (a no-op adapter). Both matrices are redrawn so the
                # update's size is set here (about 20 pixel levels on average at weight 1.0), not
                # by peft's init.
                if "lora_A" in name:
                    param.normal_(std=0.2)
                elif "lora_B" in name:
                    param.normal_(std=0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    directory.mkdir(parents=True, exist_ok=True)
    pipeline_class = StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline
    pipeline_class.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)
    return directory


def write_tiny_embedding(
    directory: Path, *, token: str = "<demo-embedding>", seed: int = 0
) -> Path:
    """A textual-inversion file in diffusers' layout (``{token: tensor[1, 32]}``); returns the
    file for ``pipe.load_textual_inversion(path, token=token)``."""
    generator = torch.Generator().manual_seed(seed)
    # Token embeddings of the tiny text encoder are drawn with std 0.02; a larger vector makes the
    # embedding's effect on the image plain to see.
    vector = torch.randn(1, TEXT_HIDDEN_SIZE, generator=generator)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / EMBEDDING_FILE_NAME
    save_file({token: vector}, str(path))
    return path


def write_tiny_vae(directory: Path, *, seed: int = 0) -> Path:
    """An AutoencoderKL folder shaped like the tiny SD 1.5/SDXL VAE with other weights."""
    # Offset the seed: this VAE must differ from the one a tiny pipeline of the same seed holds.
    with seeded(seed + 1_000_003):
        vae = tiny_vae()
    directory.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(directory, safe_serialization=True)
    return directory


# --- helper models ----------------------------------------------------------------------------


def write_tiny_safety_checker(
    directory: Path, *, flag_everything: bool = False, seed: int = 0
) -> Path:
    """A StableDiffusionSafetyChecker plus its CLIPImageProcessor in one folder (the layout of
    CompVis/stable-diffusion-safety-checker).

    The verdict does not depend on the image: each concept's threshold is set outside the cosine
    range [-1, 1], below it with ``flag_everything`` (every image is NSFW), above it otherwise.
    """
    image_size = 32
    config = CLIPConfig(
        text_config={
            "hidden_size": TEXT_HIDDEN_SIZE,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    with seeded(seed):
        checker = StableDiffusionSafetyChecker(config)
        threshold = -2.0 if flag_everything else 2.0
        with torch.no_grad():
            checker.concept_embeds.normal_()
            checker.special_care_embeds.normal_()
            checker.concept_embeds_weights.fill_(threshold)
            # Never "special care": it only adds 0.01 to scores already decided.
            checker.special_care_embeds_weights.fill_(2.0)
    checker.eval()
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    directory.mkdir(parents=True, exist_ok=True)
    checker.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return directory


def write_tiny_upscaler(directory: Path, *, seed: int = 0) -> Path:
    """A StableDiffusionUpscalePipeline folder (stabilityai/stable-diffusion-x4-upscaler's
    layout): a 7-channel UNet conditioned on the noise level, a VAE with scale factor 4."""
    tokenizer = tiny_tokenizer()
    with seeded(seed):
        # diffusers' own x4 upscaler test dummy (tests/pipelines/stable_diffusion_2).
        unet = UNet2DConditionModel(
            sample_size=32,
            # 4 latent channels + the 3 channels of the (noised) low-resolution image.
            in_channels=7,
            out_channels=4,
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TEXT_HIDDEN_SIZE,
            attention_head_dim=8,
            use_linear_projection=True,
            only_cross_attention=(True, True, False),
            # The noise level (0..max_noise_level) is passed as the class label.
            num_class_embeds=1000,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 32, 64),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            # The x4 upscaler's own latent scale; the pipeline warns about any other value.
            scaling_factor=0.08333,
        )
        text_encoder = CLIPTextModel(tiny_text_config(len(tokenizer)))
    pipe = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear"),
        scheduler=DDIMScheduler(**SD_SCHEDULE, prediction_type="v_prediction"),
        max_noise_level=350,
    )
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


_TRANSLATOR_SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]


def _translator_tokenizer() -> PreTrainedTokenizerFast:
    # A byte-level BPE with no merges: every text tokenizes, nothing needs training or a download.
    vocab = {token: index for index, token in enumerate(_TRANSLATOR_SPECIALS)}
    for char in byte_alphabet():
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Marian appends </s> to the source text and has no start token on the source side.
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        model_max_length=512,
    )


def write_tiny_translator(directory: Path, *, seed: int = 0) -> Path:
    """A tiny MarianMTModel (the architecture of Helsinki-NLP/opus-mt-*) with a fast byte-level
    tokenizer; ``AutoTokenizer`` and ``AutoModelForSeq2SeqLM`` load the folder."""
    tokenizer = _translator_tokenizer()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = MarianConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=128,
        pad_token_id=pad,
        eos_token_id=eos,
        bos_token_id=tokenizer.bos_token_id,
        decoder_start_token_id=pad,
        forced_eos_token_id=eos,
    )
    with seeded(seed):
        model = MarianMTModel(config)
    model.eval()
    # opus-mt's generation settings, plus: the output keeps to lowercase letters and spaces (any
    # other token is suppressed) and has at least a few of them, so the random model's "translation"
    # reads as words rather than special tokens or broken UTF-8.
    visible = {char for char in byte_alphabet() if char in string.ascii_lowercase} | {"Ġ"}
    vocab = tokenizer.get_vocab()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=pad,
        pad_token_id=pad,
        eos_token_id=eos,
        forced_eos_token_id=eos,
        suppress_tokens=sorted(i for t, i in vocab.items() if t not in visible and i != eos),
        min_new_tokens=4,
        num_beams=1,
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
