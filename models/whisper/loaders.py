"""Whisper weights from three formats, mapped onto `model.Whisper`'s parameter names.

* CTranslate2 folder: `model.bin` (+ `config.json`, `tokenizer.json`), fp16 tensors, fused Q/K/V.
* Hugging Face folder: `config.json` + `model.safetensors` or `pytorch_model.bin` (+ `tokenizer.json`,
  optionally `generation_config.json` for the suppress lists).
* openai-whisper checkpoint `.pt`: {"dims": ..., "model_state_dict": ...}; its tokenizer.json (and
  optionally a CTranslate2-style config.json with the suppress lists) must sit next to it.

Everything is converted to float32. Writers for the Hugging Face and openai formats exist so the
loaders can be round-trip tested (and so our weights can be handed to `transformers`).
"""
from __future__ import annotations

import json
import re
import struct
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from models.interface import ModelError
from models.whisper.model import Whisper, WhisperDims


@dataclass
class WhisperCheckpoint:
    """Weights (our names, float32) plus everything else a WhisperModel needs from the files."""

    dims: WhisperDims
    state_dict: dict[str, Tensor]
    tokenizer_path: Path
    weights_path: Path
    format: str
    suppress_ids: Optional[list[int]] = None        # None: use the default (special tokens only)
    suppress_ids_begin: Optional[list[int]] = None
    alignment_heads: list[list[int]] = field(default_factory=list)

    def build(self) -> Whisper:
        model = Whisper(self.dims)
        try:
            missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        except RuntimeError as err:   # size mismatches
            detail = "; ".join(line.strip() for line in str(err).splitlines()[1:4])
            raise ModelError(f"{self.weights_path}: weights do not fit the model dimensions {self.dims} ({detail})") from None
        missing = [k for k in missing if k != "encoder.positional_embedding"]  # a fixed table, may be absent
        if missing or unexpected:
            raise ModelError(f"{self.weights_path}: weights do not match a Whisper model "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return model.eval()


# ---- format detection ---------------------------------------------------------------------------

def detect_format(path: Path) -> str:
    """'ct2' | 'hf' | 'openai' for Whisper weights; 'fairseq' for a fairseq checkpoint file and
    'hf_other' for a Hugging Face folder of another model type (both handled elsewhere)."""
    path = Path(path)
    if path.is_dir():
        if (path / "model.bin").is_file() and _is_ct2_file(path / "model.bin"):
            return "ct2"
        if (path / "config.json").is_file() and any((path / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
            config = _read_json(path / "config.json")
            return "hf" if config.get("model_type") == "whisper" or "num_mel_bins" in config else "hf_other"
        raise ModelError(f"{path}: not a model folder (expected model.bin for CTranslate2, or config.json with "
                         f"model.safetensors / pytorch_model.bin for Hugging Face)")
    if path.is_file():
        if _is_ct2_file(path):
            return "ct2"
        ckpt = _torch_load(path)
        if isinstance(ckpt, dict) and "dims" in ckpt and "model_state_dict" in ckpt:
            return "openai"
        if isinstance(ckpt, dict) and "model" in ckpt and ("cfg" in ckpt or "args" in ckpt):
            return "fairseq"
        if ckpt is None and _looks_like_fairseq(path):
            return "fairseq"
        raise ModelError(f"{path}: unknown model file format (not a CTranslate2 model.bin, an openai-whisper "
                         f"checkpoint or a fairseq checkpoint)")
    raise ModelError(f"{path}: no such model file or folder")


def _is_ct2_file(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) < 8:
        return False
    version, name_len = struct.unpack_from("<IH", head, 0)
    return 1 <= version < 100 and head[6: 6 + name_len - 1].endswith(b"Spec")


def _pickle_bytes(path: Path) -> bytes:
    """The pickle stream of a torch file (zip archive member data.pkl, or the legacy file's head)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("data.pkl")]
            return z.read(names[0]) if names else b""
    with open(path, "rb") as f:
        return f.read(1 << 20)


def _looks_like_fairseq(path: Path) -> bool:
    """Without unpickling (fairseq pickles hold arbitrary classes): the top-level keys appear
    as strings in the pickle stream."""
    data = _pickle_bytes(path)
    return b"model" in data and (b"cfg" in data or b"args" in data)


_torch_cache: dict[Path, object] = {}


def _torch_load(path: Path) -> object:
    """torch.load(weights_only=True); None when the file holds more than plain tensors and
    containers (then it is not a Whisper checkpoint we load)."""
    key = path.resolve()
    if key not in _torch_cache:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            obj = None
        _torch_cache.clear()  # keep at most one (large) checkpoint around
        _torch_cache[key] = obj
    return _torch_cache[key]


def load_checkpoint(path: str | Path, tokenizer: Optional[str | Path] = None) -> WhisperCheckpoint:
    path = Path(path).expanduser()
    fmt = detect_format(path)
    try:
        if fmt == "ct2":
            return load_ct2(path if path.is_dir() else path.parent)
        if fmt == "hf":
            return load_hf(path, tokenizer)
        if fmt == "openai":
            return load_openai(path, tokenizer)
    finally:
        _torch_cache.clear()   # the detection's loaded checkpoint is not needed any more
    raise ModelError(f"{path}: not a Whisper model ({fmt})")


# ---- CTranslate2 --------------------------------------------------------------------------------

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2_model_bin(path: Path) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 `model.bin` (aliases resolved) as numpy arrays."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from(fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("<H")
        text = data[pos: pos + n - 1].decode()
        pos += n
        return text

    try:
        version = take("<I")
        spec = string()
        take("<I")  # spec revision
        if version < 5 or "Whisper" not in spec:
            raise ModelError(f"{path}: a CTranslate2 {spec!r} model (format {version}), not Whisper")
        variables: dict[str, np.ndarray] = {}
        for _ in range(take("<I")):
            name = string()
            shape = [take("<I") for _ in range(take("<B"))]
            code, nbytes = take("<B"), take("<I")
            if code not in _CT2_DTYPES:
                raise ModelError(f"{path}: variable {name} has unsupported data type code {code}")
            dtype = np.dtype(_CT2_DTYPES[code])
            variables[name] = np.frombuffer(data, dtype, nbytes // dtype.itemsize, pos).reshape(shape)
            pos += nbytes
        for _ in range(take("<I")):
            alias, target = string(), string()
            variables[alias] = variables[target]
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        if isinstance(err, ModelError):
            raise
        raise ModelError(f"{path}: truncated or corrupt CTranslate2 model.bin ({err})") from err
    return variables


def load_ct2(folder: Path) -> WhisperCheckpoint:
    bin_path = folder / "model.bin"
    var = read_ct2_model_bin(bin_path)

    def t(name: str) -> Tensor:
        if name not in var:
            raise ModelError(f"{bin_path}: variable {name} missing")
        return torch.from_numpy(var[name].astype(np.float32))

    def n_layers(prefix: str) -> int:
        return len({k.split("/")[1] for k in var if re.match(prefix + r"/layer_\d+/", k)})

    sd: dict[str, Tensor] = {}

    def linear(dst: str, src: str) -> None:
        sd[dst + ".weight"], sd[dst + ".bias"] = t(src + "/weight"), t(src + "/bias")

    def norm(dst: str, src: str) -> None:
        sd[dst + ".weight"], sd[dst + ".bias"] = t(src + "/gamma"), t(src + "/beta")

    def split_key_bias(dst: str, bias: Tensor) -> None:
        if bias.abs().max() > 0:
            raise ModelError(f"{bin_path}: {dst} has a non-zero key bias; not a Whisper model")

    def fused(dst: str, src: str, names: tuple[str, ...]) -> None:
        w, b = t(src + "/weight"), t(src + "/bias")
        for name, wi, bi in zip(names, w.chunk(len(names)), b.chunk(len(names))):
            sd[f"{dst}.{name}.weight"] = wi.clone()
            if name == "key":
                split_key_bias(f"{dst}.key", bi)
            else:
                sd[f"{dst}.{name}.bias"] = bi.clone()

    for side, n in (("encoder", n_layers("encoder")), ("decoder", n_layers("decoder"))):
        for i in range(n):
            src, dst = f"{side}/layer_{i}", f"{side}.blocks.{i}"
            norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
            fused(f"{dst}.attn", f"{src}/self_attention/linear_0", ("query", "key", "value"))
            linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
            if side == "decoder":
                norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
                linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
                fused(f"{dst}.cross_attn", f"{src}/attention/linear_1", ("key", "value"))
                linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
            norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
            linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
            linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    sd["encoder.positional_embedding"] = t("encoder/position_encodings/encodings")
    norm("encoder.ln_post", "encoder/layer_norm")
    sd["decoder.token_embedding.weight"] = t("decoder/embeddings/weight")
    sd["decoder.positional_embedding"] = t("decoder/position_encodings/encodings")
    norm("decoder.ln", "decoder/layer_norm")
    if "decoder/projection/weight" in var and not np.array_equal(var["decoder/projection/weight"], var["decoder/embeddings/weight"]):
        raise ModelError(f"{bin_path}: output projection is not tied to the embeddings; not a Whisper model")

    conv1, pos_enc, emb = sd["encoder.conv1.weight"], sd["encoder.positional_embedding"], sd["decoder.token_embedding.weight"]
    dims = WhisperDims(
        n_mels=conv1.shape[1], n_audio_ctx=pos_enc.shape[0], n_audio_state=pos_enc.shape[1],
        n_audio_head=int(var["encoder/num_heads"].item()), n_audio_layer=n_layers("encoder"),
        n_vocab=emb.shape[0], n_text_ctx=sd["decoder.positional_embedding"].shape[0], n_text_state=emb.shape[1],
        n_text_head=int(var["decoder/num_heads"].item()), n_text_layer=n_layers("decoder"))
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    return WhisperCheckpoint(dims=dims, state_dict=sd, tokenizer_path=folder / "tokenizer.json", weights_path=bin_path,
                             format="ct2", suppress_ids=config.get("suppress_ids"),
                             suppress_ids_begin=config.get("suppress_ids_begin"),
                             alignment_heads=config.get("alignment_heads", []))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: unreadable JSON ({err})") from err


# ---- Hugging Face -------------------------------------------------------------------------------

def _hf_names(dims: WhisperDims) -> dict[str, str]:
    """our name -> Hugging Face WhisperForConditionalGeneration name."""
    names = {"encoder.conv1.weight": "model.encoder.conv1.weight", "encoder.conv1.bias": "model.encoder.conv1.bias",
             "encoder.conv2.weight": "model.encoder.conv2.weight", "encoder.conv2.bias": "model.encoder.conv2.bias",
             "encoder.positional_embedding": "model.encoder.embed_positions.weight",
             "encoder.ln_post.weight": "model.encoder.layer_norm.weight", "encoder.ln_post.bias": "model.encoder.layer_norm.bias",
             "decoder.token_embedding.weight": "model.decoder.embed_tokens.weight",
             "decoder.positional_embedding": "model.decoder.embed_positions.weight",
             "decoder.ln.weight": "model.decoder.layer_norm.weight", "decoder.ln.bias": "model.decoder.layer_norm.bias"}
    attn = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}
    for side, n in (("encoder", dims.n_audio_layer), ("decoder", dims.n_text_layer)):
        for i in range(n):
            ours, theirs = f"{side}.blocks.{i}", f"model.{side}.layers.{i}"
            parts = [("attn", "self_attn")] + ([("cross_attn", "encoder_attn")] if side == "decoder" else [])
            for a, b in parts:
                for p, q in attn.items():
                    names[f"{ours}.{a}.{p}.weight"] = f"{theirs}.{b}.{q}.weight"
                    if p != "key":
                        names[f"{ours}.{a}.{p}.bias"] = f"{theirs}.{b}.{q}.bias"
                names[f"{ours}.{a}_ln.weight"] = f"{theirs}.{b}_layer_norm.weight"
                names[f"{ours}.{a}_ln.bias"] = f"{theirs}.{b}_layer_norm.bias"
            for p, q in (("mlp.0", "fc1"), ("mlp.2", "fc2"), ("mlp_ln", "final_layer_norm")):
                names[f"{ours}.{p}.weight"] = f"{theirs}.{q}.weight"
                names[f"{ours}.{p}.bias"] = f"{theirs}.{q}.bias"
    return names


def load_hf(folder: Path, tokenizer: Optional[str | Path] = None) -> WhisperCheckpoint:
    config = _read_json(folder / "config.json")
    try:
        dims = WhisperDims(n_mels=config["num_mel_bins"], n_audio_ctx=config["max_source_positions"],
                           n_audio_state=config["d_model"], n_audio_head=config["encoder_attention_heads"],
                           n_audio_layer=config["encoder_layers"], n_vocab=config["vocab_size"],
                           n_text_ctx=config["max_target_positions"], n_text_state=config["d_model"],
                           n_text_head=config["decoder_attention_heads"], n_text_layer=config["decoder_layers"])
    except KeyError as err:
        raise ModelError(f"{folder / 'config.json'}: not a Whisper config (missing {err})") from err
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file
        weights_path = folder / "model.safetensors"
        theirs = load_file(str(weights_path))
    else:
        weights_path = folder / "pytorch_model.bin"
        theirs = _torch_load(weights_path)
        if not isinstance(theirs, dict):
            raise ModelError(f"{weights_path}: not a plain state dict")
    theirs = {(k if k.startswith(("model.", "proj_out")) else "model." + k): v for k, v in theirs.items()}
    sd = {}
    for ours, name in _hf_names(dims).items():
        if name not in theirs:
            raise ModelError(f"{weights_path}: tensor {name} missing")
        sd[ours] = theirs[name].float()
    gen_path = folder / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else {}
    suppress = gen.get("suppress_tokens", config.get("suppress_tokens"))
    begin = gen.get("begin_suppress_tokens", config.get("begin_suppress_tokens"))
    heads = gen.get("alignment_heads", [])
    return WhisperCheckpoint(dims=dims, state_dict=sd, tokenizer_path=Path(tokenizer) if tokenizer else folder / "tokenizer.json",
                             weights_path=weights_path, format="hf", suppress_ids=suppress, suppress_ids_begin=begin,
                             alignment_heads=heads)


def hf_config(dims: WhisperDims, special: dict[str, int]) -> dict:
    """A transformers WhisperConfig dict for `dims` (special: bos/eos/decoder_start token ids)."""
    return {"model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"],
            "vocab_size": dims.n_vocab, "num_mel_bins": dims.n_mels, "d_model": dims.n_audio_state,
            "encoder_layers": dims.n_audio_layer, "encoder_attention_heads": dims.n_audio_head,
            "decoder_layers": dims.n_text_layer, "decoder_attention_heads": dims.n_text_head,
            "encoder_ffn_dim": 4 * dims.n_audio_state, "decoder_ffn_dim": 4 * dims.n_text_state,
            "max_source_positions": dims.n_audio_ctx, "max_target_positions": dims.n_text_ctx,
            "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": True,
            "pad_token_id": special["eot"], "bos_token_id": special["eot"], "eos_token_id": special["eot"],
            "decoder_start_token_id": special["sot"], "torch_dtype": "float32"}


def save_hf(ckpt: WhisperCheckpoint, folder: str | Path, special: dict[str, int]) -> Path:
    """Write `ckpt` as a Hugging Face folder (config.json, model.safetensors, tokenizer.json,
    generation_config.json with the suppress lists)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: ckpt.state_dict[ours].contiguous() for ours, name in _hf_names(ckpt.dims).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config(ckpt.dims, special), indent=1))
    gen = {"decoder_start_token_id": special["sot"], "eos_token_id": special["eot"], "pad_token_id": special["eot"],
           "suppress_tokens": ckpt.suppress_ids or [], "begin_suppress_tokens": ckpt.suppress_ids_begin or [],
           "alignment_heads": ckpt.alignment_heads}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=1))
    (folder / "tokenizer.json").write_bytes(ckpt.tokenizer_path.read_bytes())
    return folder


# ---- openai-whisper -----------------------------------------------------------------------------

def load_openai(path: Path, tokenizer: Optional[str | Path] = None) -> WhisperCheckpoint:
    ckpt = _torch_load(path)
    try:
        dims = WhisperDims(**{k: int(v) for k, v in ckpt["dims"].items()})
    except (TypeError, KeyError) as err:
        raise ModelError(f"{path}: malformed openai-whisper 'dims' ({err})") from err
    sd = {k: v.float() for k, v in ckpt["model_state_dict"].items()}
    config = _read_json(path.parent / "config.json") if (path.parent / "config.json").is_file() else {}
    return WhisperCheckpoint(dims=dims, state_dict=sd, weights_path=path, format="openai",
                             tokenizer_path=Path(tokenizer) if tokenizer else path.parent / "tokenizer.json",
                             suppress_ids=config.get("suppress_ids"), suppress_ids_begin=config.get("suppress_ids_begin"),
                             alignment_heads=config.get("alignment_heads", []))


def save_openai(ckpt: WhisperCheckpoint, path: str | Path) -> Path:
    """Write an openai-whisper style `.pt` plus tokenizer.json and config.json (suppress lists) beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in ckpt.state_dict.items()}
    torch.save({"dims": asdict(ckpt.dims), "model_state_dict": state}, path)
    (path.parent / "tokenizer.json").write_bytes(ckpt.tokenizer_path.read_bytes())
    config = {"suppress_ids": ckpt.suppress_ids or [], "suppress_ids_begin": ckpt.suppress_ids_begin or [],
              "alignment_heads": ckpt.alignment_heads}
    (path.parent / "config.json").write_text(json.dumps(config))
    return path
