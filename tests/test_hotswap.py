"""The use case end to end: LoRAs of ranks 4, 8 and 16 and a rank-4 one of scale 2 (``.alpha`` 8) brought to rank 8
by ``python -m lora_ops resize A B C D --rank 8 -o DIR`` swap into a ``torch.compile``'d FLUX transformer with
diffusers' hotswap (``load_lora_weights(..., hotswap=True)``) without one recompilation, and each swap computes
exactly what a fresh, uncompiled pipeline with that LoRA computes. The original mixed-rank files, by contrast,
recompile on a swap unless ``enable_lora_hotswap(target_rank=16)`` pads every LoRA to the largest rank before
compiling. Rank is not all the graph guards: PEFT's per-layer scale (alpha / rank) is a Python float in it, so the
set resize writes one scale for every file (the scale-2 file gets ``.alpha`` 8 at rank 8, its 2 folded into B);
the same file resized alone keeps its scale 2 and recompiles, unless ``enable_lora_hotswap`` at the set's rank
(which then pads nothing) has turned the scales into tensors.

Backends: ``aot_eager`` for the proof, ``eager`` for the contrasts. Recompilation is decided by dynamo's guards,
before any backend runs, so what these tests show about recompiling holds for every backend. ``aot_eager`` also runs
AOTAutograd's graph capture (parameters lifted to graph inputs, functionalised), the front half of ``inductor``.
``inductor`` itself passes the proof here as well (differences up to 1e-5), but compiling the tiny transformer
takes it about 60 s on two CPU cores, against about 12 s of CPU for ``aot_eager`` and 7 s for ``eager``, which is
all the contrasts need.

Tolerance: exact (``torch.equal``). ``aot_eager`` runs the captured graph with the same ATen kernels as eager
PyTorch, and a swap copies the new factors into the compiled model's parameters, so the compiled and the fresh model
do the same float operations on the same numbers. Both get their first LoRA as the file's tensors copied into fresh
memory (:func:`aligned_state`): diffusers otherwise keeps the tensors safetensors maps from the file, at the file's
byte offsets, and the 4-byte ``.alpha`` tensors between a file's factors put some of them off 16-byte alignment,
where the CPU's GEMM kernels sum in another order (measured: 1.1e-6 between two uncompiled pipelines holding the
same factors from two files). The run after ``enable_lora_hotswap(target_rank=8)``, which pads nothing and only makes
the scales tensors, is exact too; those after ``enable_lora_hotswap(target_rank=16)`` are compared within 1e-5:
zero-padded factors change the order of the float sums in each ``B @ A``.

The transformer is called directly, once per LoRA, on seeded inputs of one denoising step (4x4 packed latents, 8
text tokens): calling the whole pipeline adds text encoders and compile time, and proves nothing more here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch._dynamo.exc import RecompileError
from torch._dynamo.testing import CompileCounterWithBackend

from lora_ops.cli import main
from tests.tiny_flux import TEXT_WIDTH, TRANSFORMER_CONFIG, load_tiny_flux, tiny_flux_lora

RANKS = (4, 8, 16)
SET_RANK = 8
BACKEND = "aot_eager"  # the proof
CONTRAST_BACKEND = "eager"  # the contrast: guards only
ADAPTER = "style"
LATENT_GRID = 4  # packed latents per side: 16 image tokens
TEXT_TOKENS = 8


@pytest.fixture(scope="module")
def mixed_rank_files(tiny_flux_transformer: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three diffusers-layout LoRAs over the same modules (every block linear), ranks 4, 8 and 16, scale 1."""
    folder = tmp_path_factory.mktemp("mixed-ranks")
    paths = []
    for rank in RANKS:
        path = folder / f"style-r{rank}.safetensors"
        save_file(tiny_flux_lora(tiny_flux_transformer, rank=rank, seed=100 + rank), path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def scaled_original(tiny_flux_transformer: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4 LoRA of scale 2 (an ``.alpha`` of 8 on every module) over the same modules as the others."""
    path = tmp_path_factory.mktemp("scaled") / "scaled-r4.safetensors"
    tensors = tiny_flux_lora(tiny_flux_transformer, rank=4, seed=200)
    for key in [key for key in tensors if key.endswith(".lora_A.weight")]:
        tensors[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(2.0 * 4)
    save_file(tensors, path)
    return path


@pytest.fixture(scope="module")
def one_rank_files(
    mixed_rank_files: list[Path], scaled_original: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    """The three LoRAs and the scale-2 one at rank 8, written by the command line's set resize, in that order."""
    folder = tmp_path_factory.mktemp("rank-8")
    sources = [*mixed_rank_files, scaled_original]
    assert main(["resize", *map(str, sources), "--rank", str(SET_RANK), "-o", str(folder)]) == 0
    return [folder / path.name for path in sources]


@pytest.fixture(scope="module")
def scaled_alone(scaled_original: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scale-2 LoRA brought to rank 8 on its own: the set's modules and rank, but its own scale (``.alpha`` 16)."""
    output = tmp_path_factory.mktemp("scaled-alone") / "scaled-r8.safetensors"
    assert main(["resize", str(scaled_original), "--rank", str(SET_RANK), "-o", str(output)]) == 0
    assert file_alphas(output) == {2.0 * SET_RANK}
    return output


@pytest.fixture
def fresh_dynamo() -> None:
    """Start and end with dynamo's caches empty, so that no compiled code crosses between tests."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def file_ranks(path: Path) -> set[int]:
    """The ranks of a diffusers-layout file, read from its ``lora_A`` shapes ``[rank, in]``."""
    with safe_open(path, "pt") as handle:
        keys = handle.keys()
        return {handle.get_slice(key).get_shape()[0] for key in keys if key.endswith(".lora_A.weight")}


def file_alphas(path: Path) -> set[float]:
    """The distinct values of a file's ``.alpha`` tensors."""
    with safe_open(path, "pt") as handle:
        keys = handle.keys()
        return {float(handle.get_tensor(key)) for key in keys if key.endswith(".alpha")}


def loaded_rank(pipe: FluxPipeline) -> int:
    """The rank the transformer computes at for the adapter: the rows of one loaded ``lora_A`` weight."""
    return pipe.transformer.transformer_blocks[0].attn.to_q.lora_A[ADAPTER].weight.shape[0]


def denoise(transformer: torch.nn.Module) -> torch.Tensor:
    """One call of the transformer on fixed seeded inputs: the velocity prediction ``[1, 16, 16]``."""
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, LATENT_GRID**2, TRANSFORMER_CONFIG["in_channels"], generator=generator),
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, TEXT_WIDTH, generator=generator),
        "pooled_projections": torch.randn(1, TEXT_WIDTH, generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, LATENT_GRID, LATENT_GRID, "cpu", torch.float32),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
    }
    with torch.inference_mode():
        (prediction,) = transformer(**inputs, return_dict=False)
    return prediction


def aligned_state(path: Path) -> dict[str, torch.Tensor]:
    """The LoRA file's tensors copied into freshly allocated (aligned) memory, not mapped at the file's offsets."""
    return {key: tensor.clone() for key, tensor in load_file(path).items()}


def fresh_prediction(directory: Path, lora: Path) -> torch.Tensor:
    """What a fresh, uncompiled pipeline with only ``lora`` loaded predicts."""
    pipe = load_tiny_flux(directory)
    pipe.load_lora_weights(aligned_state(lora), adapter_name=ADAPTER)
    return denoise(pipe.transformer)


def compile_with_first(
    directory: Path, first: Path, backend: str, target_rank: int | None = None
) -> tuple[FluxPipeline, CompileCounterWithBackend, torch.Tensor]:
    """Load ``first`` into a fresh pipeline (after ``enable_lora_hotswap(target_rank=...)`` when given), compile the
    transformer with ``backend`` and run it once; return the pipeline, the compile counter and that prediction."""
    pipe = load_tiny_flux(directory)
    if target_rank is not None:
        pipe.enable_lora_hotswap(target_rank=target_rank)
    pipe.load_lora_weights(aligned_state(first), adapter_name=ADAPTER)
    counter = CompileCounterWithBackend(backend)
    pipe.transformer = torch.compile(pipe.transformer, backend=counter)
    prediction = denoise(pipe.transformer)
    assert counter.frame_count >= 1
    return pipe, counter, prediction


def test_one_rank_set_swaps_into_the_compiled_transformer_without_recompiling(
    tiny_flux_dir: Path, mixed_rank_files: list[Path], one_rank_files: list[Path], fresh_dynamo: None
) -> None:
    """Ranks 4, 8 and 16 and a scale-2 file: one rank and one scale after the set resize, so every swap reuses
    the graph compiled for the first file, the scale-2 file (its ``.alpha`` now 8 at rank 8: scale 1) included."""
    assert [file_ranks(path) for path in mixed_rank_files] == [{rank} for rank in RANKS]
    assert [file_ranks(path) for path in one_rank_files] == [{SET_RANK}] * (len(RANKS) + 1)
    assert file_alphas(one_rank_files[-1]) == {1.0 * SET_RANK}

    first, *others = one_rank_files
    pipe, counter, prediction = compile_with_first(tiny_flux_dir, first, BACKEND)
    compiled_frames = counter.frame_count
    predictions = [prediction]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for path in others:
            pipe.load_lora_weights(path, adapter_name=ADAPTER, hotswap=True)
            predictions.append(denoise(pipe.transformer))

    assert counter.frame_count == compiled_frames
    assert loaded_rank(pipe) == SET_RANK  # nothing padded: every swap computes at rank 8
    for path, prediction in zip(one_rank_files, predictions):
        assert torch.equal(prediction, fresh_prediction(tiny_flux_dir, path)), path.name
    assert all(not torch.equal(before, after) for before, after in zip(predictions, predictions[1:]))


def test_the_same_file_resized_alone_keeps_its_scale_and_recompiles(
    tiny_flux_dir: Path, one_rank_files: list[Path], scaled_alone: Path, fresh_dynamo: None
) -> None:
    """Why the set shares one scale: PEFT keeps each layer's scale (alpha / rank) as a Python float, which dynamo
    guards on. The scale-2 file resized on its own (rank 8, scale 2) swapped in after one of scale 1 recompiles."""
    pipe, _, _ = compile_with_first(tiny_flux_dir, one_rank_files[0], CONTRAST_BACKEND)
    with torch._dynamo.config.patch(error_on_recompile=True):
        pipe.load_lora_weights(scaled_alone, adapter_name=ADAPTER, hotswap=True)
        with pytest.raises(RecompileError, match=rf"scaling\['{ADAPTER}'\] == 1\.0"):
            denoise(pipe.transformer)


def test_enable_lora_hotswap_at_the_set_rank_swaps_scales_without_padding(
    tiny_flux_dir: Path, one_rank_files: list[Path], scaled_alone: Path, fresh_dynamo: None
) -> None:
    """For a file of the set's rank but another scale (not resized with the set):
    ``enable_lora_hotswap(target_rank=8)`` before the first load turns the scales into tensors; at the set's rank it
    pads nothing, and the file swaps in without recompiling."""
    pipe, counter, _ = compile_with_first(tiny_flux_dir, one_rank_files[0], CONTRAST_BACKEND, target_rank=SET_RANK)
    compiled_frames = counter.frame_count
    with torch._dynamo.config.patch(error_on_recompile=True):
        for path in (scaled_alone, one_rank_files[1]):
            pipe.load_lora_weights(path, adapter_name=ADAPTER, hotswap=True)
            assert torch.equal(denoise(pipe.transformer), fresh_prediction(tiny_flux_dir, path)), path.name
    assert counter.frame_count == compiled_frames
    assert loaded_rank(pipe) == SET_RANK


def test_mixed_rank_originals_recompile_on_a_swap(
    tiny_flux_dir: Path, mixed_rank_files: list[Path], fresh_dynamo: None
) -> None:
    rank_4, rank_8, _ = mixed_rank_files
    pipe, _, _ = compile_with_first(tiny_flux_dir, rank_4, CONTRAST_BACKEND)
    with torch._dynamo.config.patch(error_on_recompile=True):
        # The swap itself goes through: PEFT swaps the larger tensors in (torch.utils.swap_tensors) ...
        pipe.load_lora_weights(rank_8, adapter_name=ADAPTER, hotswap=True)
        assert loaded_rank(pipe) == 8
        # ... and the compiled graph's guard on the factors' shapes fails at the next call.
        with pytest.raises(RecompileError, match=r"lora_A.*size mismatch at index 0\. expected 4, actual 8"):
            denoise(pipe.transformer)


def test_mixed_rank_originals_need_enable_lora_hotswap_padding(
    tiny_flux_dir: Path, mixed_rank_files: list[Path], fresh_dynamo: None
) -> None:
    first, *others = mixed_rank_files
    pipe, counter, _ = compile_with_first(tiny_flux_dir, first, CONTRAST_BACKEND, target_rank=max(RANKS))
    assert loaded_rank(pipe) == max(RANKS)  # the rank-4 LoRA is zero-padded: every swap computes at rank 16
    compiled_frames = counter.frame_count
    with torch._dynamo.config.patch(error_on_recompile=True):
        for path in others:
            pipe.load_lora_weights(path, adapter_name=ADAPTER, hotswap=True)
            torch.testing.assert_close(
                denoise(pipe.transformer), fresh_prediction(tiny_flux_dir, path), rtol=0, atol=1e-5
            )
    assert counter.frame_count == compiled_frames
