"""Singular Value Fine-tuning (SVF): W' = U diag(s · f(z)) Vᵀ, with one trainable vector z per chosen matrix.

`apply_svf(model, SVFConfig(...))` decomposes the chosen linear layers of any `transformers` causal LM (SVD cached
on disk), swaps each for an `SVFLinear`, freezes every other parameter and returns an `SVFModel`.
`SVFModel.merge_and_unload()` folds the current z into plain weights and hands back an ordinary model that
`save_pretrained` / vLLM / any tool can use.

Speed: the recomposed weight W' is cached and rebuilt only when z changes (z's in-place version counter moves on
every optimizer step or load), so a forward pass costs what the base layer costs. The gradient reaches z without
ever forming the full weight gradient: dL/dσᵢ = Σ_tokens (g·uᵢ)(x·vᵢ), two thin matmuls.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from t2edit.files import atomic_write, cache_dir
from t2edit.precision import autocast_dtype

try:  # GPT-2-style models store linear layers transposed in a Conv1D.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

MASKS = ("sigmoid", "identity")
TARGET_PRESETS = ("mlp", "attn", "all-linear")
SVD_CACHE_VERSION = 1


@dataclass
class SVFConfig:
    """Which matrices to decompose and how z maps to singular-value multipliers.

    Defaults follow Transformer²: MLP matrices, m = sigmoid(z)·max_mult, singular values rescaled to keep
    their sum, z initialised to 0.1 (at which the rescaled weight equals the base weight exactly)."""

    target_modules: str | list[str] = "mlp"  # "mlp" | "attn" | "all-linear" | list of name suffixes / "re:<regex>"
    mask: str = "sigmoid"  # "sigmoid": m = sigmoid(z)·max_mult; "identity": m = z
    max_mult: float = 1.0
    norm_preserving: bool = True  # W' ·= Σs / Σ(s·m)
    z_init: float = 0.1
    z_init_noise: float = 0.0
    svd_cache_dir: str | None = None  # None: ~/.cache/t2edit/svd; "" disables the cache
    factor_dtype: str = "float32"

    def __post_init__(self):
        if self.mask not in MASKS:
            raise ValueError(f"SVFConfig.mask={self.mask!r} is not supported; choose one of {MASKS}")
        if isinstance(self.target_modules, str) and self.target_modules not in TARGET_PRESETS:
            self.target_modules = [self.target_modules]
        if not isinstance(self.target_modules, str):
            for pattern in self.target_modules:
                if pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as error:
                        raise ValueError(f"target_modules pattern {pattern!r} is not a valid regular expression "
                                         f"({error}); e.g. 're:.*mlp\\.down_proj'") from None

    def multiplier(self, z: torch.Tensor) -> torch.Tensor:
        """f(z): the one mask function used in training, mixing and merging alike."""
        return torch.sigmoid(z) * self.max_mult if self.mask == "sigmoid" else z

    def neutral_z(self) -> float:
        """A z value at which W' == W."""
        if self.norm_preserving:  # any uniform multiplier is undone by the rescale
            return self.z_init if self.mask == "sigmoid" else 1.0
        if self.mask == "identity":
            return 1.0
        if self.max_mult <= 1.0:
            raise ValueError("sigmoid mask without norm_preserving needs max_mult > 1 to represent the base weight")
        return math.log(1.0 / (self.max_mult - 1.0))  # sigmoid(z)·max_mult == 1


# ----------------------------------------------------------------------------------------------------------------
# Choosing layers and fingerprinting weights
# ----------------------------------------------------------------------------------------------------------------

def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def find_target_layers(model: nn.Module, target_modules) -> list[str]:
    """Names of the linear layers selected by a preset or by suffix / regex patterns. The output head is never
    chosen (it is tied to the embeddings in many models)."""
    names = []
    for name, module in model.named_modules():
        if not _is_linear(module) or name.split(".")[-1] in ("lm_head", "score", "embed_out"):
            continue
        parts = name.lower().split(".")
        if target_modules == "all-linear":
            chosen = True
        elif target_modules == "mlp":
            chosen = any(p in ("mlp", "feed_forward", "ffn") for p in parts)
        elif target_modules == "attn":
            chosen = any(p in ("attn", "self_attn", "attention", "self_attention") for p in parts)
        else:
            chosen = any(re.search(p[3:], name) if p.startswith("re:") else (name == p or name.endswith("." + p))
                         for p in target_modules)
        if chosen:
            names.append(name)
    if not names:
        raise ValueError(f"SVF target_modules={target_modules!r} matched no linear layer of "
                         f"{type(model).__name__}; use 'mlp', 'attn', 'all-linear' or name suffixes like 'down_proj'")
    return names


def weight_fingerprint(weight: torch.Tensor) -> str:
    """A cheap, stable fingerprint of a weight: shape, dtype, a strided sample of values and their sum.

    The sum is taken by numpy on a float64 copy on the host: its order of addition is then the same on every
    device and thread count (a torch sum on a GPU, or split over CPU threads, may differ in the last bits, and an
    expert trained in a one-thread CPU worker must match the same weights on a GPU)."""
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // 65536)
    sample = flat[::step].to("cpu", torch.float64)
    total = float(flat.to("cpu", torch.float64).numpy().sum())
    digest = hashlib.sha256()
    digest.update(f"{tuple(weight.shape)}|{weight.dtype}|{total:.10e}".encode())
    digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def _weight_as_out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (out_features, in_features), whatever its storage convention."""
    return module.weight.T if (Conv1D and isinstance(module, Conv1D)) else module.weight


# ----------------------------------------------------------------------------------------------------------------
# SVD with an on-disk cache
# ----------------------------------------------------------------------------------------------------------------

def default_svd_cache_dir() -> Path:
    return cache_dir("svd")


def decompose(weight: torch.Tensor, factor_dtype: torch.dtype = torch.float32):
    """U, s, Vᵀ of an (out, in) weight, computed on the weight's device (GPU when the model is on one)."""
    w = weight.detach().to(torch.float32)
    if w.shape[0] < w.shape[1]:  # LAPACK is several times faster on tall matrices: decompose Wᵀ = V S Uᵀ
        V, s, Uh = torch.linalg.svd(w.T, full_matrices=False)
        U, Vh = Uh.T, V.T
    else:
        U, s, Vh = torch.linalg.svd(w, full_matrices=False)
    return U.to(factor_dtype).contiguous(), s.to(factor_dtype).contiguous(), Vh.to(factor_dtype).contiguous()


class SVDCache:
    """One safetensors file per matrix, named by (weight fingerprint, layer name, factor dtype).

    A file is trusted only if it loads, its metadata matches, its shapes fit and it reconstructs the weight on a
    random probe vector; anything else is reported (one warning per load) and rebuilt."""

    def __init__(self, directory: str | Path | None):
        self.directory = None if directory == "" else Path(directory or default_svd_cache_dir())
        self.rebuilt: list[str] = []
        self.hits = 0

    def path(self, fingerprint: str, layer: str, dtype: torch.dtype) -> Path:
        safe_layer = re.sub(r"[^A-Za-z0-9_.-]", "_", layer)
        return self.directory / f"{fingerprint}-{safe_layer}-{str(dtype).replace('torch.', '')}.safetensors"

    def get(self, layer: str, weight: torch.Tensor, dtype: torch.dtype):
        if self.directory is None:
            return decompose(weight, dtype)
        fingerprint = weight_fingerprint(weight)
        path = self.path(fingerprint, layer, dtype)
        if path.exists():
            factors, problem = self._read(path, fingerprint, layer, weight, dtype)
            if factors is not None:
                self.hits += 1
                return factors
            self.rebuilt.append(f"{path.name} ({problem})")
        factors = decompose(weight, dtype)
        try:
            self._write(path, factors, fingerprint, layer)
        except (OSError, RuntimeError) as error:  # the cache is optional: the run goes on without it
            warnings.warn(f"SVD cache: could not write {path} ({error}); continuing without caching it",
                          stacklevel=3)
        return factors

    def _read(self, path, fingerprint, layer, weight, dtype):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device=str(weight.device)) as handle:
                meta = handle.metadata() or {}
                U, s, Vh = (handle.get_tensor(k) for k in ("U", "S", "Vh"))
        except Exception as error:  # truncated or corrupt file
            return None, f"unreadable: {type(error).__name__}"
        expected = {"fingerprint": fingerprint, "layer": layer, "version": str(SVD_CACHE_VERSION)}
        if any(meta.get(k) != v for k, v in expected.items()):
            return None, "metadata mismatch"
        out_features, in_features = weight.shape
        rank = min(out_features, in_features)
        if U.shape != (out_features, rank) or s.shape != (rank,) or Vh.shape != (rank, in_features) \
                or U.dtype != dtype:
            return None, "shape/dtype mismatch"
        probe = torch.randn(in_features, 1, device=weight.device, dtype=torch.float32)
        expected_out = weight.detach().float() @ probe
        got = U.float() @ (s.float()[:, None] * (Vh.float() @ probe))
        if not torch.isfinite(got).all() or (got - expected_out).norm() > 1e-3 * (expected_out.norm() + 1e-6):
            return None, "does not reconstruct the weight"
        return (U, s, Vh), None

    def _write(self, path: Path, factors, fingerprint: str, layer: str):
        from safetensors.torch import save_file

        U, s, Vh = (t.detach().contiguous().cpu() for t in factors)
        metadata = {"fingerprint": fingerprint, "layer": layer, "version": str(SVD_CACHE_VERSION)}
        atomic_write(path, lambda tmp: save_file({"U": U, "S": s, "Vh": Vh}, str(tmp), metadata=metadata))

    def report(self):
        if self.rebuilt:
            warnings.warn(f"SVD cache in {self.directory}: {len(self.rebuilt)} file(s) were corrupt, truncated or "
                          f"did not match the model and were rebuilt: {', '.join(self.rebuilt[:5])}"
                          + (" ..." if len(self.rebuilt) > 5 else ""), stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------
# The SVF layer
# ----------------------------------------------------------------------------------------------------------------

def _through_factors(x: torch.Tensor, sigma: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor):
    """(x V, ((x V) ⊙ σ) Uᵀ) in the factors' dtype; σ is [rank], or [batch, rank] for one σ per row of the batch."""
    h = x.to(Vh.dtype) @ Vh.T
    if sigma.dim() == 2:
        sigma = sigma.view((sigma.shape[0],) + (1,) * (x.dim() - 2) + (sigma.shape[-1],))
    return h, (h * sigma.to(h.dtype)) @ U.T


class _SpectralLinear(torch.autograd.Function):
    """y = ((x V) ⊙ σ) Uᵀ + b through the factors, for training. Against the merged weight W' = U diag(σ) Vᵀ it
    needs no W' per step and less arithmetic: the backward's g U is shared by σ's gradient (Σ_t (g U) ⊙ (x V)) and
    x's ((g U) ⊙ σ) Vᵀ, so forward + backward cost 2·r·(in + out) multiply-adds per token instead of
    2·in·out + r·(in + out) (r = min(in, out): 18 % less on a 576×1536 MLP matrix, equal on square ones)."""

    @staticmethod
    def forward(ctx, x, sigma, U, Vh, bias):
        # U and Vh come in the dtype the matmuls run in (bf16 copies under autocast).
        h, out = _through_factors(x, sigma, U, Vh)
        ctx.save_for_backward(h, sigma.to(h.dtype), U, Vh)
        ctx.x_dtype = x.dtype
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad_out):
        # The backward runs outside autocast: casts are explicit; σ's reduction is accumulated in fp32.
        h, sigma, U, Vh = ctx.saved_tensors
        gU = grad_out.to(U.dtype) @ U
        grad_x = ((gU * sigma) @ Vh).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_sigma = None
        if ctx.needs_input_grad[1]:
            grad_sigma = torch.sum((gU * h).reshape(-1, h.shape[-1]), 0, dtype=torch.float32)
        return grad_x, grad_sigma, None, None, None


class SVFLinear(nn.Module):
    """A frozen linear layer whose singular values are rescaled by f(z). The original layer is kept (frozen) as
    `base_layer`, so `unload()` restores the model bit for bit."""

    def __init__(self, base_layer: nn.Module, factors, config: SVFConfig):
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.transposed = bool(Conv1D) and isinstance(base_layer, Conv1D)
        U, s, Vh = factors
        self.register_buffer("U", U, persistent=False)
        self.register_buffer("s", s, persistent=False)
        self.register_buffer("Vh", Vh, persistent=False)
        init = torch.full_like(s, config.z_init, dtype=torch.float32)
        if config.z_init_noise:
            init += torch.randn_like(init) * config.z_init_noise
        self.z = nn.Parameter(init)
        self._cached_weight: torch.Tensor | None = None
        self._cache_key = None
        self._cast_weight: torch.Tensor | None = None  # W' in the autocast dtype (bf16), made once per z
        self._cast_key = None
        self._cast_factors: tuple | None = None  # (dtype, device, U, Vh): factors in the training matmuls' dtype
        self._frozen: tuple = (None, 0, False)  # (z's key, tokens run through the factors at that z, f(z) = 1)
        # W' is built in the base weight's dtype, recorded now: the base layer may hold a bf16 copy for a while
        # (t2edit.precision.frozen_weights_cast) and W' must not follow it.
        self.weight_dtype = _weight_as_out_in(base_layer).dtype
        self.bypass = False  # True: run the original layer (the unedited model, e.g. for a KL reference)
        # True once the factors are sharded across processes (FSDP, t2edit.training.sharding): every forward then
        # goes through the factors gathered for it and keeps no W' or cast copy of them between forwards.
        self.sharded = False
        # Two-pass inference (t2edit.routing): a callable (layer, x) -> output that gives each row of the batch its
        # own mixture of experts (or the original layer); it takes over the whole forward while set.
        self.row_plan = None

    @property
    def rank(self) -> int:
        return self.s.numel()

    def singular_values(self) -> torch.Tensor:
        """σ = s · f(z) (· Σs / Σ(s·f(z)) when norm-preserving), differentiable in z."""
        return self.singular_values_for(self.z)

    def singular_values_for(self, z: torch.Tensor) -> torch.Tensor:
        """σ for any z of shape [..., rank] (e.g. one mixture per row of a batch), by the one mask function."""
        s = self.s.float()
        sigma = s * self.config.multiplier(z.float())
        if self.config.norm_preserving:
            sigma = sigma * (s.sum() / sigma.sum(-1, keepdim=True))
        return sigma

    def weight_for(self, sigma: torch.Tensor) -> torch.Tensor:
        """U diag(σ) Vᵀ as (out, in) in the base layer's dtype: `merged_weight`'s arithmetic for a given σ."""
        return ((self.U * sigma.to(self.U.dtype)) @ self.Vh).to(self.weight_dtype)

    def forward_row_sigma(self, x: torch.Tensor, sigma_rows: torch.Tensor) -> torch.Tensor:
        """y = ((x V) ⊙ σ_row) Uᵀ + b with σ_row [batch, rank]: every row of the batch gets its own singular
        values through the shared factors, so no weight is built or copied per expert or per mixture."""
        out = _through_factors(x, sigma_rows, self.U, self.Vh)[1].to(x.dtype)
        bias = self.base_layer.bias
        return out + bias if bias is not None else out

    def merged_weight(self) -> torch.Tensor:
        """W' as (out, in), in the base layer's dtype; rebuilt only when z has changed since the last call."""
        key = (self.z._version, self.z.data_ptr())
        if self._cached_weight is None or self._cache_key != key:
            # Full precision whatever autocast is active: at the neutral z, W' must equal W.
            with torch.no_grad(), torch.autocast(self.U.device.type, enabled=False):
                self._cached_weight = self.weight_for(self.singular_values())
            self._cache_key = key
        return self._cached_weight

    def compute_weight(self, x: torch.Tensor) -> torch.Tensor:
        """W' in the dtype the matmul runs in: under autocast a bf16 copy made once per z, not cast on every call
        (in generation, one call per token); bit for bit what autocast's own cast would give."""
        weight = self.merged_weight()
        dtype = autocast_dtype(x.device)
        if dtype is None or dtype == weight.dtype or not weight.is_floating_point():
            return weight
        if self._cast_weight is None or self._cast_key != (self._cache_key, dtype):
            self._cast_weight, self._cast_key = weight.to(dtype), (self._cache_key, dtype)
        return self._cast_weight

    def factors_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """U and Vᵀ in the dtype the matmuls on `x` run in (autocast's, else x's), cast once and kept."""
        dtype = autocast_dtype(x.device) or (x.dtype if x.is_floating_point() else self.U.dtype)
        if dtype == self.U.dtype:
            return self.U, self.Vh
        if self.sharded:
            return self.U.to(dtype), self.Vh.to(dtype)
        cached = self._cast_factors
        if cached is None or cached[0] != dtype or cached[1] != self.U.device:
            cached = self._cast_factors = (dtype, self.U.device, self.U.to(dtype), self.Vh.to(dtype))
        return cached[2], cached[3]

    def forward(self, x):
        if self.bypass:
            return self.base_layer(x)
        if self.row_plan is not None:
            return self.row_plan(self, x)
        bias = self.base_layer.bias
        if self.sharded or (torch.is_grad_enabled() and self.z.requires_grad):  # through the factors, no W' built
            return _SpectralLinear.apply(x, self.singular_values(), *self.factors_for(x), bias)
        path = self._frozen_path(x)
        if path == "base":  # W' equals W
            return self.base_layer(x)
        if path == "factors":
            with torch.no_grad():
                out = _through_factors(x, self.singular_values(), *self.factors_for(x))[1]
        else:
            out = x @ self.compute_weight(x).T
        return out + bias if bias is not None else out

    def neutral(self) -> bool:
        """Whether z leaves W as it is: f(z) = 1 everywhere, or uniform when the singular values keep their sum."""
        m = self.config.multiplier(self.z.detach().float()).reshape(-1)
        return bool((m == m[0]).all()) and (self.config.norm_preserving or bool(m[0] == 1))

    def _frozen_path(self, x: torch.Tensor) -> str:
        """How a forward without gradient runs: "base" at a neutral z (W' is W), "factors" while a changed
        z has seen fewer tokens than building W' costs (about `rank` tokens through the factors: a training step
        that samples and checks a few short answers never pays for W'), else "merged" (W', built once per z: at
        most twice the cheaper of the two)."""
        key = (self.z._version, self.z.data_ptr())
        if self._frozen[0] != key:
            self._frozen = (key, 0, self.neutral())
        _, tokens, neutral = self._frozen
        if neutral:
            return "base"
        if self._cache_key == key:
            return "merged"
        tokens += x.numel() // max(1, x.shape[-1])
        self._frozen = (key, tokens, neutral)
        return "factors" if tokens <= self.rank else "merged"

    def to_plain_layer(self) -> nn.Module:
        """The base layer with W' folded in (same class, same storage convention)."""
        weight = self.merged_weight().detach().clone()
        self.base_layer.weight = nn.Parameter(weight.T.contiguous() if self.transposed else weight,
                                              requires_grad=False)
        return self.base_layer


# ----------------------------------------------------------------------------------------------------------------
# The SVF model
# ----------------------------------------------------------------------------------------------------------------

def _set_submodule(root: nn.Module, name: str, module: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def model_fingerprint(model: nn.Module, layer_names: list[str] | None = None) -> str:
    """Fingerprint of a base model: its config's class and the fingerprints of its linear weights."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, module in model.named_modules():
        if isinstance(module, SVFLinear):
            module = module.base_layer
        if _is_linear(module) and (layer_names is None or name in layer_names):
            digest.update(name.encode() + weight_fingerprint(module.weight).encode())
    return digest.hexdigest()[:32]


class SVFModel(nn.Module):
    """A causal LM whose chosen layers are `SVFLinear`s. Only the z vectors are trainable."""

    def __init__(self, base_model: nn.Module, config: SVFConfig, svf_layers: dict[str, SVFLinear],
                 base_fingerprint: str):
        super().__init__()
        self.base_model = base_model
        self.svf_config = config
        self.layer_names = list(svf_layers)
        self.base_fingerprint = base_fingerprint
        self.sharded = False  # weights and factors sharded across processes (t2edit.training.sharding)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    @property
    def config(self):  # the transformers config, like any HF model
        return self.base_model.config

    @property
    def device(self):
        return next(self.base_model.parameters()).device

    def svf_layers(self) -> dict[str, SVFLinear]:
        return {name: self.base_model.get_submodule(name) for name in self.layer_names}

    def z_parameters(self) -> list[nn.Parameter]:
        return [layer.z for layer in self.svf_layers().values()]

    def get_z(self) -> dict[str, torch.Tensor]:
        return {name: layer.z.detach().clone() for name, layer in self.svf_layers().items()}

    @torch.no_grad()
    def set_z(self, z: dict[str, torch.Tensor]):
        layers = self.svf_layers()
        missing = set(layers) - set(z)
        if missing:
            raise ValueError(f"z vectors missing for {len(missing)} SVF layer(s), e.g. {sorted(missing)[0]!r}")
        for name, layer in layers.items():
            if z[name].shape != layer.z.shape:
                raise ValueError(f"z for {name!r} has shape {tuple(z[name].shape)}, the layer needs "
                                 f"{tuple(layer.z.shape)}")
            layer.z.copy_(z[name].to(layer.z))

    @torch.no_grad()
    def reset_z(self):
        """Back to the neutral z (the base model's weights)."""
        for layer in self.svf_layers().values():
            layer.z.fill_(self.svf_config.neutral_z())

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def unload(self) -> nn.Module:
        """The original model with its original layers back (bit-identical)."""
        for name, layer in self.svf_layers().items():
            _set_submodule(self.base_model, name, layer.base_layer)
        self._restore_requires_grad()
        return self.base_model

    def merge_and_unload(self) -> nn.Module:
        """A plain transformers model with the current z folded into its weights. After this call the base
        layers hold the edited weights; keep a copy of the base model if you still need it."""
        for name, layer in self.svf_layers().items():
            _set_submodule(self.base_model, name, layer.to_plain_layer())
        self._restore_requires_grad()
        return self.base_model

    def _restore_requires_grad(self):
        for name, param in self.base_model.named_parameters():
            param.requires_grad_(self._requires_grad_before.get(name, False))


@contextlib.contextmanager
def _layers_set(model: SVFModel, **attributes):
    """Set attributes on every SVF layer for the duration of a block, then put the previous values back."""
    layers = list(model.svf_layers().values())
    before = [{name: getattr(layer, name) for name in attributes} for layer in layers]
    for layer in layers:
        for name, value in attributes.items():
            setattr(layer, name, value)
    try:
        yield
    finally:
        for layer, values in zip(layers, before):
            for name, value in values.items():
                setattr(layer, name, value)


def model_bypassed(model: SVFModel):
    """Context in which every SVF layer runs its original base layer: the unedited model, at no cost."""
    return _layers_set(model, bypass=True)


def rows_planned(model: SVFModel, plan):
    """Context in which every SVF layer hands its forward to `plan(layer, x)` (per-row expert mixtures)."""
    return _layers_set(model, row_plan=plan)


def apply_svf(model: nn.Module, config: SVFConfig | None = None, progress: bool = True) -> SVFModel:
    """Decompose the chosen layers of `model` (in place), freeze everything else, return an `SVFModel`."""
    config = config or SVFConfig()
    if isinstance(model, SVFModel):
        raise ValueError("this model already has SVF layers; call .unload() first or reuse it")
    names = find_target_layers(model, config.target_modules)
    requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    base_fingerprint = model_fingerprint(model)
    cache = SVDCache(config.svd_cache_dir)
    factor_dtype = getattr(torch, config.factor_dtype)
    for param in model.parameters():
        param.requires_grad_(False)
    layers = {}
    for name in tqdm(names, desc="SVD of target matrices", disable=not progress, leave=False):
        base_layer = model.get_submodule(name)
        factors = cache.get(name, _weight_as_out_in(base_layer), factor_dtype)
        layers[name] = SVFLinear(base_layer, factors, config).to(base_layer.weight.device)
        _set_submodule(model, name, layers[name])
    cache.report()
    svf_model = SVFModel(model, config, layers, base_fingerprint)
    svf_model._requires_grad_before = requires_grad_before
    return svf_model


def svf_config_dict(config: SVFConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if k != "svd_cache_dir"}


__all__ = ["SVFConfig", "SVFLinear", "SVFModel", "SVDCache", "apply_svf", "find_target_layers", "model_bypassed",
           "model_fingerprint", "rows_planned", "weight_fingerprint", "svf_config_dict"]
