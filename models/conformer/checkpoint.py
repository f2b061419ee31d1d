"""Load (and write) FBK-fairseq checkpoints without importing fairseq or omegaconf.

A fairseq `.pt` is a pickle that names omegaconf, argparse, fairseq meter and numpy globals. We
unpickle it with an allow-list (model_reference.md §5.3): known-safe globals are real objects, the
configuration/metric classes become inert placeholders, and anything able to run code (os.system,
subprocess, builtins.eval, ...) is refused with a ModelError. Never falls back to an unrestricted load.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import collections
import json
import pickle
import re
import types
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from models.conformer.model import ConformerConfig, ConformerModel
from models.interface import ModelError

# ---------------------------------------------------------------------------------------------
# Restricted unpickling
# ---------------------------------------------------------------------------------------------

_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float",
                  "bool", "complex", "object", "slice", "range"}
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("_codecs", "encode"): __import__("_codecs").encode,
}
# Modules whose globals can run code or touch the system: refused outright.
_DANGEROUS_MODULES = {"os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty",
                      "pickle", "_pickle", "marshal", "ctypes", "functools", "operator", "types", "code", "codeop",
                      "multiprocessing", "signal", "asyncio", "webbrowser", "pathlib", "io", "tempfile", "builtins",
                      "platform", "threading", "inspect", "pydoc", "timeit", "cProfile", "profile", "pdb", "bdb",
                      "sqlite3", "urllib", "http", "ftplib", "smtplib", "telnetlib", "glob", "zipimport", "torch"}


class _Placeholder(dict):
    """Inert stand-in for an unknown class: keeps its constructor args and pickled state, does nothing."""

    _module = _name = ""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.__dict__["_args"] = args

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def append(self, item):
        self.__dict__.setdefault("_items", []).append(item)

    def extend(self, items):
        self.__dict__.setdefault("_items", []).extend(items)


_placeholder_types: dict[tuple[str, str], type] = {}


def _placeholder(module: str, name: str) -> type:
    key = (module, name)
    if key not in _placeholder_types:
        _placeholder_types[key] = type(name, (_Placeholder,), {"_module": module, "_name": name})
    return _placeholder_types[key]


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _compat_pickle.NAME_MAPPING:          # Python-2 names (protocol 2)
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module == "builtins" and name in _SAFE_BUILTINS:
            return getattr(__import__("builtins"), name)
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "typing":
            return _placeholder(module, name)
        root = module.split(".")[0]
        if root in _DANGEROUS_MODULES or module in _DANGEROUS_MODULES:
            raise ModelError(f"checkpoint refers to the global {module}.{name}, which is not allowed "
                             "(it could run code); refusing to load it")
        return _placeholder(module, name)


restricted_pickle = types.ModuleType("xs2t_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()
restricted_pickle.loads = lambda b, **kw: RestrictedUnpickler(__import__("io").BytesIO(b), **kw).load()


def to_plain(obj: Any) -> Any:
    """Placeholders (omegaconf nodes/containers, meters, ...) and Namespaces -> plain Python values."""
    if isinstance(obj, argparse.Namespace):
        return {k: to_plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, _Placeholder):
        state = obj.__dict__.get("_state")
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        if isinstance(state, dict):
            if "_content" in state:                        # omegaconf container
                return to_plain(state["_content"])
            if "_val" in state:                            # omegaconf value node
                return to_plain(state["_val"])
        if "_items" in obj.__dict__:
            return [to_plain(v) for v in obj.__dict__["_items"]]
        if len(obj):
            return {k: to_plain(v) for k, v in obj.items()}
        return {"__class__": f"{obj._module}.{obj._name}", "state": state}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    return obj


def load_fairseq_checkpoint(path: str | Path) -> dict:
    """{'model': state dict, 'args': flat model args (dict), 'cfg': plain cfg} of a fairseq .pt."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False,
                          mmap=zipfile.is_zipfile(path))
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None
    except Exception as e:  # corrupt or not a torch file
        raise ModelError(f"{path}: cannot read as a fairseq checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ModelError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    ckpt.pop("last_optimizer_state", None)                 # Adam moments: ~2x the model, never needed
    state = ckpt["model"]
    cfg = to_plain(ckpt.get("cfg")) or {}
    args = to_plain(ckpt.get("args"))
    if not isinstance(args, dict):
        args = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    if isinstance(cfg, dict):                              # FBK criterion/task fields live in other groups
        for group in ("task", "criterion"):
            extra = cfg.get(group)
            if isinstance(extra, dict):
                args = {**{k: v for k, v in extra.items() if k != "_name"}, **args}
                args.setdefault(f"{group}_name", extra.get("_name"))
    return {"model": dict(state), "args": args, "cfg": cfg}


# ---------------------------------------------------------------------------------------------
# State dict -> model
# ---------------------------------------------------------------------------------------------

def upgrade_state_dict(state: dict) -> dict:
    """Old fairseq key aliases -> current names; drop buffers we recompute."""
    norms = {"0": "self_attn_layer_norm", "1": "encoder_attn_layer_norm", "2": "final_layer_norm"}
    out = {}
    for key, value in state.items():
        m = re.match(r"(decoder\.layers\.\d+)\.layer_norms\.([012])\.(weight|bias)$", key)
        if m:
            key = f"{m.group(1)}.{norms[m.group(2)]}.{m.group(3)}"
        elif key == "decoder.embed_out":
            key = "decoder.output_projection.weight"
        elif key in ("decoder.embed_positions.weights", "decoder.embed_positions._float_tensor", "decoder.version"):
            continue
        out[key] = value
    return out


def _count_layers(state: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in state for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(idx) + 1 if idx else 0


def config_from_checkpoint(state: dict, args: dict) -> ConformerConfig:
    """Architecture from the checkpoint args, with shape fallbacks (model_reference.md §5.2)."""
    def get(name, default=None):
        v = args.get(name)
        return default if v is None else v

    arch = get("_name") or get("arch") or ("conformer_joint_ctc" if any(k.startswith("auxiliary_decoder.") for k in state) else "conformer")
    if arch not in ("conformer", "conformer_joint_ctc"):
        if any(k.startswith("encoder.conformer_layers.") for k in state):
            arch = "conformer_joint_ctc" if any(k.startswith("auxiliary_decoder.") for k in state) else "conformer"
        else:
            raise ModelError(f"unsupported architecture {arch!r} (only FBK conformer / conformer_joint_ctc)")
    try:
        conv_w = [state[f"encoder.subsample.conv_layers.{i}.weight"] for i in range(_count_layers(state, "encoder.subsample.conv_layers."))]
        D = int(conv_w[-1].shape[0] // 2)
        embed = state["decoder.embed_tokens.weight"]
        ffn_rows = state["encoder.conformer_layers.0.first_feed_forward.first_linear.weight"].shape[0]
        u_bias = state["encoder.conformer_layers.0.attention.attention.u_bias"]
        dw = state["encoder.conformer_layers.0.conv_module.depthwise_conv1d.weight"]
        fc1 = state["decoder.layers.0.fc1.weight"]
    except KeyError as e:
        raise ModelError(f"checkpoint lacks the expected FBK conformer key {e}") from None
    if int(get("encoder_embed_dim", D)) != D or int(embed.shape[1]) != D:
        raise ModelError(f"inconsistent model dims: encoder {D}, decoder {int(embed.shape[1])}")
    if get("decoder_normalize_before", True) is False:
        raise ModelError("post-norm decoders (decoder_normalize_before=False) are not supported")
    if get("decoder_learned_pos", False) or "decoder.embed_positions.weight" in state:
        raise ModelError("learned decoder positions are not supported (FBK models use sinusoidal ones)")
    if get("no_token_positional_embeddings", False) or get("layernorm_embedding", False) or get("adaptive_softmax_cutoff"):
        raise ModelError("decoder options no_token_positional_embeddings/layernorm_embedding/adaptive_softmax are not supported")
    if get("activation_fn", "relu") != "relu":
        raise ModelError(f"decoder activation {get('activation_fn')!r} is not supported (relu only)")
    if int(get("conv_expansion_factor", 2)) != 2:
        raise ModelError("conv_expansion_factor must be 2")
    kernels = get("conv_kernel_sizes", None)
    kernels = tuple(int(k) for k in str(kernels).split(",")) if kernels else tuple(int(w.shape[-1]) for w in conv_w)
    has_ctc = "encoder.ctc_fc.weight" in state
    strategy = get("ctc_compress_strategy", "none") or "none"
    ctc_layer = int(get("ctc_encoder_layer", 0) or 0)
    n_enc = _count_layers(state, "encoder.conformer_layers.")
    if strategy != "none" and not (has_ctc and ctc_layer):
        raise ModelError(f"ctc_compress_strategy {strategy!r} needs encoder.ctc_fc and ctc_encoder_layer")
    share = bool(get("share_decoder_input_output_embed", False))
    return ConformerConfig(
        arch=arch,
        input_feat=int(conv_w[0].shape[1]),
        conv_channels=int(conv_w[0].shape[0]) if len(conv_w) > 1 else int(get("conv_channels", 1024)),
        conv_kernel_sizes=kernels,
        d_model=D,
        encoder_layers=n_enc,
        encoder_heads=int(u_bias.shape[0]),
        ffn_expansion=int(ffn_rows // D),
        conv_kernel=int(dw.shape[-1]),
        decoder_layers=_count_layers(state, "decoder.layers."),
        decoder_heads=int(get("decoder_attention_heads", 8)),   # not inferable from shapes
        decoder_ffn=int(fc1.shape[0]),
        vocab_size=int(embed.shape[0]),
        ctc_vocab_size=int(state["encoder.ctc_fc.weight"].shape[0]) if has_ctc else 0,
        ctc_layer=(ctc_layer or n_enc) if has_ctc else 0,
        ctc_compress_strategy=strategy,
        ctc_compress_max_out_size=int(get("ctc_compress_max_out_size", -1)),
        ctc_compress_fixed_ratio=int(get("ctc_compress_fixed_ratio", 4)),
        aux_lang_layernorm="auxiliary_decoder.lang_embed_layernorm.weight" in state,
        scale_embedding=not bool(get("no_scale_embedding", False)),
        share_decoder_io=share,
        max_source_positions=int(get("max_source_positions", 6000)),
        max_target_positions=int(get("max_target_positions", 1024)),
        safe_shift=True,   # inference always overrides batch_unsafe_relative_shift to False
    )


def build_model(state: dict, cfg: ConformerConfig, source: str = "checkpoint") -> ConformerModel:
    """Build the module and load `state` strictly (pe kept once, BN counters ignored)."""
    state = upgrade_state_dict(state)
    pe_keys = [k for k in state if k.endswith("attention.positional_encoding.pe")]
    pe = state.get(pe_keys[0]) if pe_keys else None
    state = {k: v for k, v in state.items() if k not in pe_keys and not k.endswith("num_batches_tracked")}
    if cfg.share_decoder_io:
        state.setdefault("decoder.output_projection.weight", state.get("decoder.embed_tokens.weight"))
    with torch.device("meta"):
        model = ConformerModel(cfg)
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelError(f"{source}: state dict does not match the {cfg.arch} architecture; "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for k, p in model.state_dict().items():
        if k in expected and tuple(state[k].shape) != tuple(p.shape):
            raise ModelError(f"{source}: {k} has shape {tuple(state[k].shape)}, expected {tuple(p.shape)}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, assign=True, strict=False)
    if cfg.share_decoder_io:
        model.decoder.output_projection.weight = model.decoder.embed_tokens.weight
    for mod in model.modules():           # BN counters are dropped from the file; give them real storage
        if isinstance(mod, torch.nn.BatchNorm1d):
            mod.num_batches_tracked = torch.zeros((), dtype=torch.long)
    if pe is not None:                    # the checkpoint's own table (identical in every layer)
        model.encoder.set_pos_table(pe.float().clone())
    return model.eval()


def load_conformer(path: str | Path) -> tuple[ConformerModel, dict]:
    """A fairseq .pt -> (eval-mode ConformerModel on CPU, flat args)."""
    ckpt = load_fairseq_checkpoint(path)
    cfg = config_from_checkpoint(ckpt["model"], ckpt["args"])
    model = build_model(ckpt["model"], cfg, source=str(path))
    del ckpt["model"]
    return model, ckpt["args"]


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def config_to_args(cfg: ConformerConfig) -> dict:
    """fairseq-style flat model args of a config (what `config_from_checkpoint` reads back)."""
    return {
        "_name": cfg.arch, "arch": cfg.arch,
        "encoder_embed_dim": cfg.d_model, "decoder_embed_dim": cfg.d_model,
        "encoder_layers": cfg.encoder_layers, "decoder_layers": cfg.decoder_layers,
        "encoder_attention_heads": cfg.encoder_heads, "decoder_attention_heads": cfg.decoder_heads,
        "feed_forward_expansion_factor": cfg.ffn_expansion, "conv_expansion_factor": 2,
        "encoder_ffn_embed_dim": cfg.decoder_ffn, "decoder_ffn_embed_dim": cfg.decoder_ffn,
        "conformer_conv_kernel_size": cfg.conv_kernel, "conformer_half_step_residual": True,
        "conv_kernel_sizes": ",".join(str(k) for k in cfg.conv_kernel_sizes), "conv_channels": cfg.conv_channels,
        "input_feat_per_channel": cfg.input_feat, "input_channels": 1,
        "no_scale_embedding": not cfg.scale_embedding, "share_decoder_input_output_embed": cfg.share_decoder_io,
        "decoder_normalize_before": True, "decoder_learned_pos": False, "activation_fn": "relu",
        "ctc_encoder_layer": cfg.ctc_layer, "ctc_compress_strategy": cfg.ctc_compress_strategy,
        "ctc_compress_max_out_size": cfg.ctc_compress_max_out_size,
        "ctc_compress_fixed_ratio": cfg.ctc_compress_fixed_ratio,
        "ignore_prefix_size": 1 if cfg.aux_lang_layernorm else 0,
        "batch_unsafe_relative_shift": False,
        "max_source_positions": cfg.max_source_positions, "max_target_positions": cfg.max_target_positions,
    }


def save_fbk_checkpoint(model: ConformerModel, path: str | Path, args: Optional[dict] = None) -> None:
    """Write a fairseq-style checkpoint: {'args': None, 'cfg': {'model': Namespace}, 'model': state}.

    `pe` tables are not stored (the loader regenerates them); `decoder.version` is, as fairseq does.
    """
    flat = {**config_to_args(model.cfg), **(args or {})}
    state = collections.OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
    if model.cfg.share_decoder_io:
        state["decoder.output_projection.weight"] = state["decoder.embed_tokens.weight"]
    state["decoder.version"] = torch.tensor([3.0])
    cfg = {"model": argparse.Namespace(**flat), "task": argparse.Namespace(_name="speech_to_text_ctc"),
           "criterion": argparse.Namespace(_name="ctc_multi_loss" if model.cfg.ctc_vocab_size else "label_smoothed_cross_entropy")}
    torch.save({"args": None, "cfg": cfg, "model": state, "optimizer_history": [], "extra_state": {}}, Path(path))


# ---------------------------------------------------------------------------------------------
# HF-format folders (FAMA on the Hub): map keys by structure onto the fairseq names
# ---------------------------------------------------------------------------------------------

# (pattern on a source key after prefix stripping) -> fairseq key template. Tried in order.
_HF_RENAMES = [
    (r"^lm_head\.weight$", "decoder.output_projection.weight"),
    (r"^(?:model\.)?encoder\.layers\.(\d+)\.", r"encoder.conformer_layers.\1."),
    (r"^(?:model\.)?encoder\.conformer\.layers\.(\d+)\.", r"encoder.conformer_layers.\1."),
    (r"^(?:model\.)?encoder\.subsampler\.", "encoder.subsample."),
    (r"^(?:model\.)?encoder\.subsample\.conv_layers\.", "encoder.subsample.conv_layers."),
    (r"^(?:model\.)?decoder\.final_layer_norm\.", "decoder.layer_norm."),
    (r"^(?:model\.)?decoder\.embed_out$", "decoder.output_projection.weight"),
]
_HF_PREFIXES = ("model.", "fama.", "speech_model.", "module.")


def _read_hf_tensors(folder: Path) -> dict:
    tensors: dict = {}
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file
        for f in files:
            tensors.update(load_file(str(f)))
        return tensors
    bins = sorted(folder.glob("pytorch_model*.bin"))
    for f in bins:
        obj = torch.load(f, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
        tensors.update(obj)
    if not tensors:
        raise ModelError(f"{folder}: no *.safetensors or pytorch_model*.bin weights found")
    return tensors


def map_hf_state(source: dict) -> tuple[dict, list[str]]:
    """Rename HF keys to fairseq names. Returns (mapped state, unmapped source keys)."""
    mapped, unmapped = {}, []
    fairseq_like = re.compile(r"^(encoder\.(subsample|conformer_layers|ctc_fc)|decoder\.(embed_tokens|layers|layer_norm|output_projection)|auxiliary_decoder)\b")
    for key, value in source.items():
        k = key
        for p in _HF_PREFIXES:
            if k.startswith(p) and fairseq_like.match(k[len(p):]):
                k = k[len(p):]
                break
        if not fairseq_like.match(k):
            for pat, rep in _HF_RENAMES:
                new = re.sub(pat, rep, k)
                if new != k:
                    k = new
                    if fairseq_like.match(k):
                        break
        if fairseq_like.match(k) or k.endswith("positional_encoding.pe"):
            if k in mapped:
                raise ModelError(f"HF key {key} maps onto {k}, which is already assigned")
            mapped[k] = value
        else:
            unmapped.append(key)
    return mapped, unmapped


def load_hf_fama(folder: str | Path) -> tuple[ConformerModel, dict, list[str]]:
    """An HF-format folder (config.json + weights) -> (model, args, unmapped source keys)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"not a model folder: {folder}")
    config = {}
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
    state, unmapped = map_hf_state(_read_hf_tensors(folder))
    if "decoder.output_projection.weight" not in state and "decoder.embed_tokens.weight" in state:
        config.setdefault("share_decoder_input_output_embed", True)
    args = {k: config[k] for k in config if isinstance(config[k], (int, float, str, bool))}
    if "decoder_attention_heads" not in args:
        for name in ("num_attention_heads", "decoder_attention_heads", "attention_heads"):
            if name in config:
                args["decoder_attention_heads"] = config[name]
    args.pop("_name", None)
    args.pop("arch", None)
    cfg = config_from_checkpoint(state, args)
    model = build_model(state, cfg, source=str(folder))
    return model, args, unmapped
