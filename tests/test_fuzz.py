"""Property-based fuzzing (hypothesis) of the safetensors reader and of the rank-changing math.

Reader: files built from random LoRA headers, then mutated (dtypes, shapes, offsets, metadata, key names,
the length prefix, truncation, trailing or flipped bytes), and headers of arbitrary JSON, go through
`read_header`, `inspect_file` and `resize_file`. The only acceptable outcomes are success or `LoraError`
with a one-line message: never another exception, never an output or temporary file after a refusal, never
a changed input. An accepted file's output must read back as a valid LoRA at the asked rank.

Math: ranks (above and below the file's, above min(out, in)), shapes, zero factors and factor dtypes fed to
`lora_ops.linalg` and `resize_factors`, checked against the dense float64 delta: the exact SVD is optimal
(Eckart-Young), the extension is exact, `relative_error` equals the dense error.

Examples are derandomized (CI draws the same ones every run) and bounded by `max_examples`, sized so the
file runs in seconds on 2 busy cores. `LORA_OPS_FUZZ=explore` draws fresh random examples, 20 times as many.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import lora_ops
from lora_ops import linalg
from lora_ops.batching import resize_factors
from lora_ops.files import DEFAULT_LIMITS, DTYPE_BYTES, Limits, read_header
from lora_ops.options import MAX_RANK

EXPLORE = os.environ.get("LORA_OPS_FUZZ") == "explore"


def fuzz_settings(examples: int) -> settings:
    """Bounded, reproducible hypothesis settings: `examples` per test (20x with LORA_OPS_FUZZ=explore)."""
    return settings(
        max_examples=examples * (20 if EXPLORE else 1),
        deadline=None,
        derandomize=not EXPLORE,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- building files -------------------------------------------------------------------------------------

# (down suffix, up suffix) of each layout, and module names that select its flavours
FACTOR_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_down.weight", ".lora_up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
)
FACTOR_SUFFIX_NAMES = tuple(suffix for pair in FACTOR_SUFFIXES for suffix in pair)
MODULE_NAMES = (
    "transformer.transformer_blocks.0.attn.to_q",
    "transformer.single_transformer_blocks.1.proj_out",
    "lora_unet_double_blocks_0_img_attn_qkv",
    "unet.down_blocks.0.attentions.0.proj_in",
    "base_model.model.blocks.0.q",
)
# key names that are not plain LoRA (refused), and stray tensors (passed through)
ODD_KEYS = (
    "lora_unet_a.hada_w1_a",
    "lora_unet_b.lokr_w1",
    "x.lora_mid.weight",
    "x.lora_magnitude_vector",
    "text_model.embed.weight",
    "",
    "a\nb.lora_A.weight",
)
FACTOR_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
JUNK_DTYPES = (*DTYPE_BYTES, "F4", "f32", "", "float32")

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
# dimensions and offsets: mostly small, some negative or far beyond any limit
dimensions = st.integers(min_value=-3, max_value=2**40) | st.integers(min_value=0, max_value=8)


@dataclass
class FileParts:
    """A safetensors file in pieces: header entries (JSON-able, may be broken on purpose), data, byte edits."""

    header: dict
    data: bytes
    prefix_delta: int = 0
    cut: int = 0
    tail: bytes = b""
    flips: tuple[tuple[int, int], ...] = ()

    def to_bytes(self) -> bytes:
        """The file: length prefix (shifted by `prefix_delta`), header, data; then `flips`, `cut` and `tail`."""
        text = json.dumps(self.header).encode()
        raw = bytearray(struct.pack("<Q", max(0, len(text) + self.prefix_delta)) + text + self.data)
        for position, value in self.flips:
            raw[position % len(raw)] = value
        return bytes(raw[: len(raw) - self.cut] if self.cut else raw) + self.tail


def _tensor_bytes(shape: list[int], dtype: torch.dtype, seed: int) -> bytes:
    """Raw little-endian bytes of a seeded standard normal tensor."""
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return values.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _pack(tensors: dict[str, tuple[str, list[int], bytes]], metadata: object) -> FileParts:
    """A well-formed file of `tensors` (key -> (dtype, shape, bytes)), offsets in key order."""
    header: dict = {} if metadata is None else {"__metadata__": metadata}
    data, position = b"", 0
    for key, (dtype, shape, payload) in sorted(tensors.items()):
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + len(payload)]}
        data, position = data + payload, position + len(payload)
    return FileParts(header, data)


@st.composite
def lora_tensors(draw) -> dict[str, tuple[str, list[int], bytes]]:
    """1-3 LoRA modules of one layout (ranks may exceed the matrix sides), maybe alphas and a stray tensor."""
    down_suffix, up_suffix = draw(st.sampled_from(FACTOR_SUFFIXES))
    names = draw(st.lists(st.sampled_from(MODULE_NAMES), min_size=1, max_size=3, unique=True))
    dtype = draw(st.sampled_from(sorted(FACTOR_TORCH_DTYPES)))
    seed = draw(st.integers(0, 2**16))
    tensors = {}
    for index, name in enumerate(names):
        rank, out, inp = draw(st.integers(1, 6)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
        conv = draw(st.booleans())
        down_shape, up_shape = ([rank, inp, 1, 1], [out, rank, 1, 1]) if conv else ([rank, inp], [out, rank])
        tensors[name + down_suffix] = (
            dtype,
            down_shape,
            _tensor_bytes(down_shape, FACTOR_TORCH_DTYPES[dtype], seed + index),
        )
        tensors[name + up_suffix] = (
            dtype,
            up_shape,
            _tensor_bytes(up_shape, FACTOR_TORCH_DTYPES[dtype], ~seed - index),
        )
        alpha = draw(st.none() | st.floats(-4, 64) | st.sampled_from([math.nan, math.inf]))
        if alpha is not None:
            tensors[name + ".alpha"] = ("F32", [], struct.pack("<f", alpha))
    if draw(st.booleans()):
        tensors["text_model.embed.weight"] = ("F32", [2], _tensor_bytes([2], torch.float32, seed))
    return tensors


metadata_values = st.none() | st.dictionaries(st.text(max_size=6), st.text(max_size=12), max_size=3) | json_values
# diffusers' adapter metadata: ranks, alphas and (regular-expression) patterns a file may carry
adapter_fields = st.fixed_dictionaries(
    {
        "transformer.r": st.integers(-1, 8) | json_scalars,
        "transformer.lora_alpha": st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(["nan", "inf", "4"]),
        "transformer.rank_pattern": st.dictionaries(st.sampled_from(["^blocks", "(", "to_q", "[a-", ".*"]), dimensions),
    }
)
adapter_metadata = adapter_fields.map(lambda fields: {"lora_adapter_metadata": json.dumps(fields)})


@st.composite
def mutated_lora_files(draw) -> FileParts:
    """A LoRA file with up to three header mutations and maybe byte-level damage."""
    tensors = draw(lora_tensors())
    metadata = draw(metadata_values | adapter_metadata)
    parts = _pack(tensors, metadata)
    keys = sorted(key for key in parts.header if key != "__metadata__")
    mutations = st.sampled_from(("dtype", "shape", "offsets", "entry", "drop", "rename", "add"))
    for mutation in draw(st.lists(mutations, max_size=3)):
        key = draw(st.sampled_from(keys))
        entry = parts.header.get(key)
        if not isinstance(entry, dict):
            continue
        if mutation == "dtype":
            entry["dtype"] = draw(st.sampled_from(JUNK_DTYPES) | json_values)
        elif mutation == "shape":
            entry["shape"] = draw(st.lists(dimensions, max_size=4) | json_values)
        elif mutation == "offsets":
            entry["data_offsets"] = draw(st.lists(dimensions, min_size=2, max_size=2) | json_values)
        elif mutation == "entry":
            parts.header[key] = draw(json_values)
        elif mutation == "drop":
            parts.header.pop(key)
        elif mutation == "rename":
            parts.header[draw(st.sampled_from(ODD_KEYS))] = parts.header.pop(key)
        else:
            parts.header[draw(st.sampled_from(ODD_KEYS))] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    parts.prefix_delta = draw(st.sampled_from((0, 0, 0, -1, 1, 8, -8, 2**40)))
    parts.cut = draw(st.sampled_from((0, 0, 0, 1, 4, 100)))
    parts.tail = draw(st.sampled_from((b"", b"", b"\x00", b"junk!!!!")))
    parts.flips = tuple(draw(st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=3)))
    return parts


# --- the contract -----------------------------------------------------------------------------------------


def refusal(call) -> str | None:
    """Run `call`; None when it succeeds, the message when it raises `LoraError`. Anything else propagates."""
    try:
        call()
    except lora_ops.LoraError as error:
        message = str(error)
        assert message.strip() and "\n" not in message and "\r" not in message, repr(message)
        return message
    return None


def check_every_entry_point(data: bytes, options: lora_ops.ResizeOptions, limits: Limits = DEFAULT_LIMITS) -> None:
    """The reader, inspect and resize on `data`: success or a one-line refusal, never a partial output."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder, "in", "lora.safetensors")
        source.parent.mkdir()
        source.write_bytes(data)
        outputs = Path(folder, "out")
        outputs.mkdir()
        destination = outputs / "resized.safetensors"

        header_refused = refusal(lambda: read_header(source, limits))
        inspect_refused = refusal(lambda: lora_ops.inspect_file(source, limits=limits))
        resize_refused = refusal(lambda: lora_ops.resize_file(source, destination, options, limits=limits))

        if header_refused:
            assert inspect_refused == resize_refused == header_refused
        assert (inspect_refused is None) == (resize_refused is None), (inspect_refused, resize_refused)
        assert source.read_bytes() == data
        assert list(source.parent.iterdir()) == [source]
        if resize_refused:
            assert list(outputs.iterdir()) == []
            return
        assert list(outputs.iterdir()) == [destination]
        report = lora_ops.inspect_file(destination)
        assert set(report["ranks"]) == {str(options.rank)}
        with safe_open(str(destination), "pt") as handle:
            keys = handle.keys()
            factors = [key for key in keys if key.endswith(FACTOR_SUFFIX_NAMES)]
            assert factors and all(torch.isfinite(handle.get_tensor(key)).all() for key in factors)


@st.composite
def resize_options(draw) -> lora_ops.ResizeOptions:
    return lora_ops.ResizeOptions(
        rank=draw(st.integers(1, 9)), method=draw(st.sampled_from(lora_ops.METHODS)), seed=draw(st.integers(0, 9))
    )


def _raw(header: str | bytes) -> bytes:
    """A file that is only a length prefix and `header` (text is UTF-8 encoded)."""
    text = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(text)) + text


DEEP_JSON = "[" * 50_000 + "]" * 50_000
SMALL_LORA = _pack(
    {
        "transformer.a.lora_A.weight": ("F32", [2, 4], bytes(32)),
        "transformer.a.lora_B.weight": ("F32", [3, 2], bytes(24)),
    },
    None,
)


def _with_adapter_metadata(fields: object) -> bytes:
    """SMALL_LORA (with random factors) carrying `lora_adapter_metadata` = JSON of `fields`."""
    tensors = {
        "transformer.a.lora_A.weight": ("F32", [2, 4], _tensor_bytes([2, 4], torch.float32, 1)),
        "transformer.a.lora_B.weight": ("F32", [3, 2], _tensor_bytes([3, 2], torch.float32, 2)),
    }
    text = fields if isinstance(fields, str) else json.dumps(fields)
    return _pack(tensors, {"lora_adapter_metadata": text}).to_bytes()


@fuzz_settings(examples=150)
@given(parts=mutated_lora_files(), options=resize_options())
@example(parts=SMALL_LORA, options=lora_ops.ResizeOptions(rank=2)).via("all-zero factors")
@example(
    parts=FileParts({"a.lora_A.weight": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    options=lora_ops.ResizeOptions(rank=2),
).via("unhashable dtype")
@example(
    parts=FileParts({"a.lora_A.weight": {"dtype": "F32", "shape": [True, 1], "data_offsets": [0, 4]}}, bytes(4)),
    options=lora_ops.ResizeOptions(rank=2),
).via("boolean dimension")
def test_mutated_lora_files_are_read_or_refused_in_one_line(parts, options):
    check_every_entry_point(parts.to_bytes(), options)


@fuzz_settings(examples=60)
@given(data=st.binary(max_size=64) | json_values.map(lambda value: _raw(json.dumps(value))))
@example(data=_raw(DEEP_JSON)).via("deeply nested header")
@example(data=_raw('{"a": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}')).via(
    "integer beyond int_max_str_digits"
)
@example(data=_raw('{"a": 1}'.encode("utf-16"))).via("UTF-16 header")
def test_arbitrary_headers_are_read_or_refused_in_one_line(data):
    check_every_entry_point(data, lora_ops.ResizeOptions(rank=2))


@fuzz_settings(examples=40)
@given(data=adapter_fields.map(_with_adapter_metadata))
@example(data=_with_adapter_metadata(DEEP_JSON)).via("deeply nested adapter metadata")
@example(data=_with_adapter_metadata({"transformer.r": 2, "transformer.lora_alpha": "nan"})).via("NaN alpha")
@example(data=_with_adapter_metadata({"transformer.r": 2, "transformer.lora_alpha": 1e308})).via("huge alpha")
@example(data=_with_adapter_metadata({"transformer.r": math.inf})).via("infinite rank")
@example(data=_with_adapter_metadata({"transformer.r": 2, "transformer.rank_pattern": {"(": 2}})).via("bad regex")
def test_adapter_metadata_is_read_or_refused_in_one_line(data):
    check_every_entry_point(data, lora_ops.ResizeOptions(rank=1))


@fuzz_settings(examples=60)
@given(
    parts=mutated_lora_files(),
    limits=st.builds(
        Limits,
        header_bytes=st.integers(0, 2048),
        tensors=st.integers(0, 8),
        elements_per_tensor=st.integers(0, 64),
        elements_total=st.integers(0, 256),
    ),
)
def test_accepted_headers_respect_the_limits(parts, limits):
    data = parts.to_bytes()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "lora.safetensors")
        path.write_bytes(data)
        if refusal(lambda: read_header(path, limits)) is not None:
            return
        header = read_header(path, limits)
    elements = [math.prod(info.shape) for info in header.tensors.values()]
    assert struct.unpack("<Q", data[:8])[0] <= limits.header_bytes
    assert len(header.tensors) <= limits.tensors
    assert all(count <= limits.elements_per_tensor for count in elements)
    assert sum(elements) <= limits.elements_total


# --- the math ---------------------------------------------------------------------------------------------

ZEROED = ("none", "down", "up", "both", "down-row")


@dataclass(frozen=True)
class Factors:
    """A LoRA pair as float64 matrices, ``down [r, n]`` and ``up [m, r]``, as stored in a dtype then read back;
    ``compute``: the dtype `resize` does the tall products in for that storage dtype."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    compute: torch.dtype

    def batch(self, dtype: torch.dtype | None = None) -> linalg.Factors:
        """The pair as a batch of one for `lora_ops.linalg`, in ``dtype`` (default: `compute`)."""
        dtype = dtype or self.compute
        return linalg.Factors.of(self.down.to(dtype)[None], self.up.to(dtype)[None], self.scale)

    @property
    def delta(self) -> torch.Tensor:
        """The dense ``[m, n]`` delta."""
        return self.scale * self.up @ self.down


@st.composite
def factor_pairs(draw) -> Factors:
    m, n, r = draw(st.integers(1, 24)), draw(st.integers(1, 24)), draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    down = torch.randn(r, n, generator=generator).to(dtype).double()
    up = torch.randn(m, r, generator=generator).to(dtype).double()
    zeroed = draw(st.sampled_from(ZEROED))
    if zeroed in ("down", "both"):
        down.zero_()
    if zeroed in ("up", "both"):
        up.zero_()
    if zeroed == "down-row":
        down[0].zero_()
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64
    return Factors(down, up, draw(st.sampled_from([1.0, 0.25, 4.0, -2.0])), compute)


def _dense_error(delta: torch.Tensor, new_down: torch.Tensor, new_up: torch.Tensor) -> float:
    norm = torch.linalg.matrix_norm(delta).item()
    return torch.linalg.matrix_norm(delta - new_up @ new_down).item() / norm if norm else 0.0


@fuzz_settings(examples=120)
@given(factors=factor_pairs(), rank=st.integers(1, 30))
def test_exact_svd_is_the_optimal_rank_k_approximation(factors, rank):
    singular = torch.linalg.svdvals(factors.delta)
    norm = torch.linalg.vector_norm(singular).item()
    batch = factors.batch(torch.float64)
    thin = linalg.FactorSVD.of(batch)
    new_down, new_up = (x[0] for x in linalg.svd(thin, rank).apply(batch))
    assert new_down.shape == (min(rank, factors.down.shape[0]), factors.down.shape[1])
    assert new_up.shape == (factors.up.shape[0], new_down.shape[0])
    kept = int(thin.ranks)
    assert torch.allclose(thin.s[0, :kept], singular[:kept], atol=1e-9 * max(norm, 1.0))
    assert not thin.s[0, kept:].any()
    assert torch.all(singular[kept:] <= 1e-5 * max(norm, 1e-300))
    optimum = torch.linalg.vector_norm(singular[rank:]).item()
    achieved = torch.linalg.matrix_norm(factors.delta - new_up @ new_down).item()
    assert abs(achieved - optimum) <= 1e-7 * max(norm, 1.0)


@fuzz_settings(examples=120)
@given(factors=factor_pairs(), extra=st.integers(0, 30))
def test_extension_keeps_the_delta_exactly(factors, extra):
    r, n = factors.down.shape
    rank = r + extra
    batch = factors.batch(torch.float64)
    options = lora_ops.ResizeOptions(rank=rank)
    generators = [torch.Generator().manual_seed(rank)]
    new_down, new_up, errors = resize_factors(
        batch, linalg.FactorSVD.of(batch), rank, options, generators, (torch.float64, torch.float64)
    )
    new_down, new_up = new_down[0], new_up[0]
    assert new_down.shape == (rank, n) and new_up.shape == (factors.up.shape[0], rank)
    assert torch.equal(new_down[:r], factors.down) and not new_up[:, r:].any()
    assert torch.allclose(new_up @ new_down, factors.delta, rtol=0, atol=1e-12 * max(factors.delta.abs().max(), 1))
    assert errors.item() <= 1e-12
    new_rows = new_down[r:]
    live = new_rows[new_rows.abs().sum(dim=1) > 0]
    assert torch.allclose(live @ live.T, torch.eye(live.shape[0], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(live @ factors.down.T, torch.zeros(live.shape[0], r, dtype=torch.float64), atol=1e-8)


@fuzz_settings(examples=120)
@given(
    factors=factor_pairs(),
    rank=st.integers(1, 30),
    method=st.sampled_from(lora_ops.METHODS),
    stored=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
)
def test_every_method_gives_exactly_the_rank_and_its_error_is_the_dense_error(factors, rank, method, stored):
    options = lora_ops.ResizeOptions(rank=rank, method=method)
    batch = factors.batch()
    thin = linalg.FactorSVD.of(batch)
    runs = {}
    for dtype in (stored, factors.compute):  # rounded to storage, and as computed
        generators = [torch.Generator().manual_seed(0)]
        down, up, errors = resize_factors(batch, thin, rank, options, generators, (dtype, dtype))
        runs[dtype] = down[0].double(), up[0].double(), errors.item()
    new_down, new_up, error = runs[stored]
    assert new_down.shape == (rank, factors.down.shape[1]) and new_up.shape == (factors.up.shape[0], rank)
    assert torch.isfinite(new_down).all() and torch.isfinite(new_up).all()
    assert abs(error - _dense_error(factors.delta, new_down, new_up)) <= 1e-6
    if rank >= factors.down.shape[0] or method == "svd":
        singular = torch.linalg.svdvals(factors.delta)
        norm = torch.linalg.vector_norm(singular).item()
        optimum = torch.linalg.vector_norm(singular[rank:]).item() / norm if norm else 0.0
        assert abs(runs[factors.compute][2] - optimum) <= 1e-6


def test_max_rank_is_what_the_options_accept():
    assert lora_ops.ResizeOptions(rank=MAX_RANK).rank == MAX_RANK
    for rank in (0, MAX_RANK + 1, -1):
        assert refusal(lambda rank=rank: lora_ops.ResizeOptions(rank=rank)) == f"rank must be between 1 and {MAX_RANK}"
