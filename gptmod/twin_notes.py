"""The hand-written notes of the side-by-side page (gptmod/side_by_side.py), one per row.

A row is keyed "file:name": "model.py:GPT" is the class header (with `__init__`),
"model.py:GPT.forward" one method (paired with JAX's `__call__`), HEADER the imports. Each note
declares the code fragments its claims rest on, per side; tests/test_side_by_side.py asserts every
fragment occurs in that side's code of the row, so a note cannot outlive the code it describes.
`code` in backticks becomes <code> on the page.
"""

from __future__ import annotations

import dataclasses

HEADER = "module header"


@dataclasses.dataclass(frozen=True)
class Note:
    """A note's prose and the fragments each side's code in its row must contain."""

    text: str
    torch: tuple[str, ...] = ()
    jax: tuple[str, ...] = ()


def _n(text: str, torch: tuple[str, ...] = (), jax: tuple[str, ...] = ()) -> Note:
    return Note(text, torch, jax)


_MODEL = {
    HEADER: _n(
        "torch brings its own module system (`nn`), functional ops (`F`) and the SDPA backend "
        "switch (`sdpa_kernel`, `SDPBackend`; the torch file maps backend names to them in "
        "`_PINNED`). JAX itself has only immutable arrays (`jnp`) and function transformations; "
        "`from flax import nnx` supplies what `torch.nn` does. The JAX file also imports "
        "`sharding`, which gives parameters and caches logical axis names for a device mesh. "
        "Only torch imports `ml_dtypes`, because NumPy has no bfloat16 and torch tensors cannot "
        "hand theirs over directly (see `_to_numpy`).",
        torch=(
            "from torch import nn",
            "import torch.nn.functional as F",
            "from torch.nn.attention import SDPBackend, sdpa_kernel",
            "_PINNED = {",
            "import ml_dtypes",
        ),
        jax=("import jax.numpy as jnp", "from flax import nnx", "from gptmod_jax import sharding"),
    ),
    "compute_dtype": _n(
        "The same rule in both: promote the activation dtype to at least fp32 "
        "(`torch.promote_types` vs `jnp.promote_types`). The torch twin also runs as a float64 "
        "reference; JAX creates float64 arrays only with x64 mode enabled, so by default the "
        "JAX twin computes in fp32.",
        torch=("torch.promote_types(dtype, torch.float32)", "fp64 for the float64 reference"),
        jax=("jnp.promote_types(dtype, jnp.float32)", "fp64 only if x64 is enabled"),
    ),
    "resid_init_std": _n(
        "Identical: GPT-2 scales the init of the projections that write into the residual "
        "stream (`wo`, `w_down`) by 1/sqrt(2 n_layer), so the stream's variance does not grow "
        "with depth.",
        torch=("cfg.init_std / math.sqrt(2 * cfg.n_layer)",),
        jax=("cfg.init_std / math.sqrt(2 * cfg.n_layer)",),
    ),
    "Linear": _n(
        "Both twins write their own linear layer with torch's names and (out, in) layout, so "
        "canonical state needs no transposes (`nnx.Linear` keeps an (in, out) `kernel`). Each "
        "draws its weight from N(0, std²) as it is built: torch from the global RNG "
        "(`torch.empty(...).normal_`), JAX from the `rngs` it is given (`rngs.params()`), in the "
        "`dtype` it is given. JAX wraps the array with `sharding.param`, an `nnx.Param` that "
        "also carries the logical `axes` of (out, in).",
        torch=("torch.empty(d_out, d_in).normal_(0.0, std)", "nn.Parameter("),
        jax=(
            "nnx.initializers.normal(std)(rngs.params(), (d_out, d_in), dtype)",
            "sharding.param(weight, axes)",
            "whose kernel is (in, out)",
        ),
    ),
    "Linear.forward": _n(
        "`F.linear(x, w, b)` is `x @ w.T + b`, written out in JAX, which reads a parameter's "
        "array with `[...]`. `kernels.py` swaps in faster products for CPU decode in both.",
        torch=("F.linear(x, self.weight, self.bias)",),
        jax=("x @ self.weight[...].T", "y + self.bias[...]"),
    ),
    "Embedding": _n(
        "The token table, `weight` (V, D), in both, drawn as `Linear` draws its weight; "
        "`nnx.Embed` would call it `embedding`.",
        torch=("torch.empty(n, d).normal_(0.0, std)",),
        jax=("nnx.initializers.normal(std)(rngs.params(), (n, d), dtype)", "nnx.Embed says"),
    ),
    "Embedding.forward": _n(
        "`F.embedding` vs `jnp.take(..., axis=0)`, which fills an id past the table with NaN "
        "where torch raises (under jit nothing can raise on a value).",
        torch=("F.embedding(idx, self.weight)",),
        jax=("jnp.take(self.weight[...], idx, axis=0)", "gathers NaN"),
    ),
    "Embedding.attend": _n(
        "The tied unembedding, x @ table^T: `F.linear` without a bias vs the product written out.",
        torch=("F.linear(x, self.weight)",),
        jax=("x @ self.weight[...].T",),
    ),
    "int8_linear": _n(
        "The int8 product, identical in both: convert q to the activation dtype (exact, since "
        "|q| <= 127), multiply, then scale each output channel. The scale can wait until after "
        "the sum because it is one per output row. `kernels.py` writes the same product so "
        "that the compiler reads the int8 weights directly.",
        torch=("F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)",),
        jax=("(x @ q.T.astype(x.dtype)) * scale.astype(x.dtype)",),
    ),
    "Int8Linear": _n(
        "The same names in both: `weight` (int8, (out, in)), `weight_scale` and `bias`, so a "
        "quantized state (gptmod/quant.py) loads by name. torch keeps the int8 weight and its "
        "scale as buffers, because an integer tensor cannot require grad. JAX holds them as "
        "`nnx.Param`s like any other weight, so `load_state` and `export_state` see them. "
        "There is nothing to draw: `load_state` fills in the zeros.",
        torch=(
            'register_buffer("weight", torch.zeros(d_out, d_in, dtype=torch.int8))',
            'register_buffer("weight_scale", torch.ones(d_out))',
        ),
        jax=(
            "sharding.param(jnp.zeros((d_out, d_in), jnp.int8), axes)",
            "sharding.param(jnp.ones((d_out,), dtype), axes[:1])",
        ),
    ),
    "Int8Embedding": _n(
        "The int8 table and one scale per row, named and held as in `Int8Linear`.",
        torch=('register_buffer("weight", torch.zeros(n, d, dtype=torch.int8))',),
        jax=("sharding.param(jnp.zeros((n, d), jnp.int8), axes)",),
    ),
    "Int8Embedding.forward": _n(
        "A lookup dequantizes only the rows it reads, each with its own scale: `F.embedding` "
        "twice in torch (the table, then the scales as a one-column table), `jnp.take` twice "
        "in JAX. The tied unembedding (`attend`) is `int8_linear`, because each row of the "
        "table is one output channel there.",
        torch=("F.embedding(idx, self.weight).to(scale.dtype)", "F.embedding(idx, scale[:, None])"),
        jax=("jnp.take(self.weight[...], idx, axis=0)", "jnp.take(scale, idx, axis=0)"),
    ),
    "to_int8": _n(
        "It swaps every layer that `quantized_names` lists for its int8 twin, in place. torch "
        "finds and replaces a layer by its dotted path (`get_submodule`, `set_submodule`). "
        "JAX walks the path itself, indexing `nnx.List` by number, and hands the old weight's "
        "logical axes on, so that under a mesh the int8 weights shard like the float ones.",
        torch=("model.get_submodule(path)", "model.set_submodule(path, new.to(old.weight.device))"),
        jax=('get_metadata().get("out_sharding"', "setattr(parent, leaf, new)"),
    ),
    "LayerNorm": _n(
        "torch registers a parameter by assigning an `nn.Parameter`; JAX assigns "
        "`sharding.param(...)`, an `nnx.Param`. The JAX twin creates parameters directly in the "
        "model's `dtype` (an `__init__` argument), while torch makes fp32 parameters and leaves "
        "casting to `model.to(dtype)`. JAX passes `eps` explicitly, as torch does, and keeps "
        "torch's `weight`/`bias` names (`nnx.LayerNorm` would call the weight `scale`).",
        torch=("nn.Parameter(torch.ones(cfg.d_model))", "self.eps = cfg.norm_eps"),
        jax=(
            "sharding.param(jnp.ones((cfg.d_model,), dtype)",
            "dtype: jnp.dtype = jnp.float32",
            "self.eps = cfg.norm_eps",
        ),
    ),
    "LayerNorm.forward": _n(
        "torch calls the fused `F.layer_norm`; JAX writes mean, variance and `jax.lax.rsqrt` "
        "out. Both upcast input and parameters to `compute_dtype` (fp32 for a bf16 model) and "
        "cast only the result back.",
        torch=("F.layer_norm(x.to(ct)", "self.weight.to(ct)", "y.to(x.dtype)"),
        jax=("jax.lax.rsqrt(var + self.eps)", "self.weight[...].astype(ct)", ".astype(x.dtype)"),
    ),
    "RMSNorm": _n(
        "As in `LayerNorm`: `nn.Parameter` vs `sharding.param`, parameters made in the model's "
        "dtype in JAX but cast afterwards in torch.",
        torch=("nn.Parameter(torch.ones(cfg.d_model))",),
        jax=("sharding.param(jnp.ones((cfg.d_model,), dtype)",),
    ),
    "RMSNorm.forward": _n(
        "torch calls the fused `F.rms_norm`; JAX spells out x · rsqrt(mean(x²) + eps). Either way "
        "the normalisation runs in `compute_dtype` and only the output is cast back.",
        torch=("F.rms_norm(x.to(ct)", ".to(x.dtype)"),
        jax=("jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)",),
    ),
    "make_norm": _n(
        "The JAX factory takes a `dtype` because Flax parameters are created in their final "
        "dtype; the torch factory needs none, since `model.to(dtype)` casts every parameter "
        "after construction.",
        torch=("def make_norm(cfg: ModelConfig) -> nn.Module",),
        jax=("def make_norm(cfg: ModelConfig, dtype: jnp.dtype)", "LayerNorm(cfg, dtype=dtype)"),
    ),
    "rope_cos_sin": _n(
        "Line for line the same math: `torch.as_tensor` vs `jnp.asarray`, `.to(ct)` vs "
        "`.astype(ct)`, and the tensor methods `.cos()`/`.sin()` vs the functions "
        "`jnp.cos`/`jnp.sin`. torch must be told to put the frequency table on the positions' "
        "device; `jnp.asarray` uses JAX's default device.",
        torch=("torch.as_tensor(rope_inv_freq(cfg), dtype=ct, device=positions_BT.device)",),
        jax=("jnp.asarray(rope_inv_freq(cfg), dtype=ct)", "jnp.cos(angles_BTh)"),
    ),
    "apply_rope": _n(
        "The same half-split rotation; only spellings differ: `x.chunk(2, dim=-1)` vs "
        "`jnp.split(x, 2, axis=-1)`, `torch.cat(..., dim=-1)` vs `jnp.concatenate(..., axis=-1)` "
        "(torch says `dim`, NumPy-style JAX says `axis`). Both rotate in the cos/sin dtype (fp32) "
        "and cast back to the input dtype.",
        torch=(".chunk(2, dim=-1)", "torch.cat(", "dim=-1).to(x_BTNH.dtype)"),
        jax=("jnp.split(x_BTNH.astype(cos_BTh.dtype), 2, axis=-1)", "jnp.concatenate("),
    ),
    "BlockInputs": _n(
        "The same named tuple: what `GPT.embed` computes once per forward and every block and "
        "attention layer reads (RoPE tables, positions, the mask over the cache, the backend). "
        "Only the array types in the annotations differ.",
        torch=("class BlockInputs(NamedTuple)", "pos_BT: torch.Tensor"),
        jax=("class BlockInputs(NamedTuple)", "pos_BT: jax.Array"),
    ),
    "reference_attention": _n(
        "The same written-out softmax. Grouped-query kv heads are expanded with "
        "`repeat_interleave` in torch and `jnp.repeat` in JAX, both repeating each head "
        "consecutively (unlike `torch.tile`/`jnp.tile`). The mask reads inverted: "
        "`masked_fill(~mask, min)` fills where its condition is True, `jnp.where(mask, scores, "
        "min)` keeps the scores where it is True.",
        torch=("repeat_interleave(N // K, dim=2)", "masked_fill(~mask_BTS[:, None]"),
        jax=("jnp.repeat(k_BSKH, N // K, axis=2)", "jnp.where(mask_BTS[:, None], scores_BNTS"),
    ),
    "resolve_backend": _n(
        "Both turn the backend name into what runs, once per call. JAX picks the kernel with the "
        "`implementation` argument of `jax.nn.dot_product_attention`, and None never selects "
        'cuDNN by itself, so "auto" becomes "cudnn" when `jax_cudnn_unmet` lists no unmet '
        'constraint for `jax.devices()[0]`, else "xla". torch\'s "sdpa" lets PyTorch\'s '
        "dispatcher choose, and a pinned kernel is checked with `torch_pinned_unmet` for the "
        "device type it is given. Either way, a named backend that cannot run raises "
        "`BackendUnavailableError`.",
        torch=(
            'if backend in ("sdpa", "reference")',
            "torch_pinned_unmet(",
            "device: str",
            "raise BackendUnavailableError(",
        ),
        jax=(
            "device = jax.devices()[0]",
            "jax_cudnn_unmet(",
            'return "xla" if unmet else "cudnn"',
            "raise BackendUnavailableError(",
        ),
    ),
    "attention": _n(
        "`F.scaled_dot_product_attention` wants (B, N, T, H), so torch transposes q, k, v in and "
        "the output back; `jax.nn.dot_product_attention` takes (B, T, N, H) as is. A pinned torch "
        "backend is the context manager `sdpa_kernel(...)`, and a kernel that refuses raises a "
        "RuntimeError re-raised as `BackendUnavailableError`; JAX passes `implementation=`. Both "
        "use `is_causal` without a mask, else a boolean mask (True = attend), which torch passes "
        "as (B, 1, T, S) for SDPA to broadcast and JAX broadcasts to (B, N, T, S) itself; "
        "grouped-query attention is `enable_gqa` in torch and native in JAX.",
        torch=(
            "t.transpose(1, 2) for t in (q_BTNH, k_BSKH, v_BSKH)",
            "out_BNTH.transpose(1, 2)",
            "sdpa_kernel(pinned)",
            "except RuntimeError as e:",
            "is_causal=mask_BTS is None",
            "mask_BTS[:, None]",
            "enable_gqa=K != N",
        ),
        jax=(
            "jax.nn.dot_product_attention(",
            "implementation=implementation",
            "is_causal=mask_BTS is None",
            "jnp.broadcast_to(mask_BTS[:, None], (B, N, T, k_BSKH.shape[1]))",
            "native GQA",
        ),
    ),
    "cached_attention": _n(
        "The same attention over the cache: each twin hands `attention` the (B, S, K, H) views it "
        "expects, and a prefill from key 0 (no mask) reads only the first T keys. torch's cache "
        "is (B, K, S, H), SDPA's own layout, so the views cost nothing; JAX's keys are "
        "(B, K, H, S), so this readable path transposes them, and `kernels.py` multiplies the "
        "cache layouts without these views.",
        torch=("k_BKSH[:, :, :T]", "k_BKSH.transpose(1, 2)"),
        jax=("k_BKHS[..., :T]", "k_BKHS.transpose(0, 3, 1, 2)"),
    ),
    "KVCache": _n(
        "torch keeps the cache in buffers registered with `persistent=False`: they move with the "
        "module but stay out of `state_dict()`, hence out of `export_state`. NNX makes them "
        "`nnx.Cache` variables (`sharding.cache`), a Variable type apart from `nnx.Param`, so "
        "`nnx.split(model, nnx.Param, nnx.Cache)` can hand them to a jitted loop. Values are "
        "(B, K, S, H) in both; keys are (B, K, S, H) in torch, SDPA's own layout, and "
        "(B, K, H, S) in JAX, the layout XLA's CPU dot multiplies without a copy.",
        torch=('register_buffer("k"', "persistent=False", "(batch, n_kv_head, max_len, head_dim)"),
        jax=(
            "sharding.cache(jnp.zeros((batch, n_kv_head, head_dim, max_len), dtype), axes)",
            "jnp.zeros((batch, n_kv_head, max_len, head_dim), dtype)",
            "nnx.split(model, nnx.Param, nnx.Cache)",
        ),
    ),
    "KVCache.capacity": _n(
        "The sequence axis is axis 2 of torch's keys but of JAX's values only, since JAX's keys "
        "are (B, K, H, S).",
        torch=("self.k.shape[2]",),
        jax=("self.v.shape[2]",),
    ),
    "KVCache.update": _n(
        "torch writes in place (`self.k[rows_B1, :, pos_BT] = k_BTKH`); JAX arrays are "
        "immutable, so `.at[...].set(...)` builds a new array that is stored back with "
        "`self.k[...] = ...` (inside a jitted step with the cache donated, XLA makes that an "
        "in-place update). JAX first sends an out-of-range position to `capacity`, where the "
        "write is dropped, because nothing can raise on a value under jit; under a mesh each "
        "row is written by `sharding.write_rows`.",
        torch=("self.k[rows_B1, :, pos_BT] = k_BTKH",),
        jax=(
            "self.k[...] = self.k[...].at[rows_B1, :, :, pos_BT].set(k_BTKH)",
            "pos_BT, self.capacity)",
            "sharding.write_rows(",
        ),
    ),
    "Attention": _n(
        "The same projections, built from each twin's `Linear` (`wo` with the residual std); the "
        "JAX layers also get `dtype`, `rngs` and logical `axes`. `kv_cache` starts as "
        "`nnx.data(None)` because NNX treats a None attribute as static and would refuse the "
        "`KVCache` that `setup_cache` assigns later.",
        torch=("self.kv_cache: KVCache | None = None", "std=resid_std)"),
        jax=("nnx.data(None)", 'axes=("embed", "heads")', '"rngs": rngs'),
    ),
    "Attention.forward": _n(
        "The same steps; torch reshapes with `.view` (no copy, or an error), JAX with `.reshape` "
        "(arrays have no views). The cache's layout shows in the names: `k_BKSH` in torch, "
        "`k_BKHS` in JAX.",
        torch=(".view(B, T, self.n_head, self.head_dim)", "k_BKSH, v_BKSH = self.kv_cache.update"),
        jax=(".reshape(B, T, self.n_head, self.head_dim)", "k_BKHS, v_BKSH = self.kv_cache.update"),
    ),
    "Attention.attend_cache": _n(
        "A method of its own so that a subclass can replace it: JAX's `kernels.py` does "
        "(`CpuDecodeAttention`, its CPU path in the cache layouts); torch's needs no such swap.",
        torch=("return cached_attention(q_BTNH, k_BKSH, v_BKSH",),
        jax=("return cached_attention(q_BTNH, k_BKHS, v_BKSH",),
    ),
    "GeluMLP": _n(
        "The linear layers follow `Attention` (`w_down` with the residual std; logical `axes` "
        "in JAX).",
        torch=("std=resid_init_std(cfg)",),
        jax=("std=resid_init_std(cfg)", 'axes=("embed", "mlp")'),
    ),
    "GeluMLP.forward": _n(
        'GPT-2\'s tanh-approximated GELU is `approximate="tanh"` in torch, whose default is the '
        "exact erf form, and `approximate=True` in JAX, where it already is the default.",
        torch=('F.gelu(self.w_up(x), approximate="tanh")',),
        jax=("jax.nn.gelu(self.w_up(x), approximate=True)",),
    ),
    "SwiGLU": _n(
        "Three linear layers, built as in `GeluMLP`.",
        torch=("self.w_gate = Linear(",),
        jax=("self.w_gate = Linear(",),
    ),
    "SwiGLU.forward": _n(
        "`F.silu` and `jax.nn.silu` are the same function.",
        torch=("F.silu(self.w_gate(x))",),
        jax=("jax.nn.silu(self.w_gate(x))",),
    ),
    "Block": _n(
        "The same pre-norm residual block. The JAX constructor threads `dtype` and `rngs` into "
        "every child because NNX creates and initialises parameters at construction; torch "
        "modules take neither.",
        torch=("self.attn = Attention(cfg)",),
        jax=("self.attn = Attention(cfg, dtype=dtype, rngs=rngs)", "make_norm(cfg, dtype)"),
    ),
    "Block.forward": _n(
        "NNX calls a module through `__call__`, torch through `forward` (run by "
        "`nn.Module.__call__`, which also runs hooks); the bodies are the same.",
        torch=("def forward(self, x_BTD: torch.Tensor, inputs: BlockInputs)",),
        jax=("def __call__(self, x_BTD: jax.Array, inputs: BlockInputs)",),
    ),
    "GPT": _n(
        "Randomness is explicit in JAX: the caller passes `nnx.Rngs` and every layer draws its "
        "init key from it, while torch layers draw from the global RNG (`torch.manual_seed`). "
        "Layers live in `nn.ModuleList` vs `nnx.List` (NNX refuses a plain list of modules), and "
        "the weight dtype is `dtype` at construction in JAX vs `model.to(dtype)` afterwards in "
        "torch. `kernels=True` (the default) calls each twin's `install`, which swaps in its CPU "
        "decode fast paths.",
        torch=(
            "torch.manual_seed",
            "nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))",
            "kernels: bool = True",
            "from gptmod_torch.kernels import install",
            "install(self)",
        ),
        jax=(
            "rngs: nnx.Rngs",
            "nnx.List([Block(cfg, dtype=dtype, rngs=rngs)",
            "dtype: jnp.dtype = jnp.float32",
            "kernels: bool = True",
            "from gptmod_jax.kernels import install",
            "install(self)",
        ),
    ),
    "GPT.setup_cache": _n(
        "torch allocates the cache on the parameters' device and dtype; JAX needs only the "
        "dtype, since `sharding.cache` places the arrays (the default device, or the mesh).",
        torch=("p.dtype, p.device",),
        jax=("dtype = self.norm.weight.dtype",),
    ),
    "GPT.check_input": _n(
        "Both hand the shared `check_input` (gptmod/inputs.py) their own notion of an integer "
        "array. JAX checks shapes while tracing and skips only the value checks on a "
        "`jax.core.Tracer` (`embed` turns bad values into NaN instead).",
        torch=("is_array=lambda a: isinstance(a, torch.Tensor)", "check_input("),
        jax=("isinstance(a, (jax.Array, np.ndarray))", "jax.core.Tracer", "check_input("),
    ),
    "GPT.forward": _n(
        "torch skips the checks under `torch.compile` (`torch.compiler.is_compiling`), which "
        "cannot raise on values; JAX always calls them, and they see only shapes under jit.",
        torch=("if not torch.compiler.is_compiling():",),
        jax=("self.check_input(idx_BT, positions_BT)",),
    ),
    "GPT.embed": _n(
        "The same embedding and mask; JAX adds a guard torch does not need: an id or position "
        "that jit cannot check becomes NaN (`jnp.where(valid_BT[..., None], x_BTD, jnp.nan)`), "
        "never another token's logits. `sharding.constrain` pins the residual stream's batch "
        "axis to the mesh (a no-op without one).",
        torch=(".expand_as(",),
        jax=("jnp.where(valid_BT[..., None], x_BTD, jnp.nan)", "sharding.constrain("),
    ),
    "GPT.head": _n(
        "The tied unembedding is `tok_emb.attend` in both; the soft-cap is `torch.tanh` vs "
        "`jnp.tanh`.",
        torch=("self.tok_emb.attend(x_BTD)", "torch.tanh("),
        jax=("self.tok_emb.attend(x_BTD)", "jnp.tanh("),
    ),
    "_to_numpy": _n(
        "PyTorch only: a bfloat16 torch tensor has no `.numpy()` (NumPy has no bfloat16), so its "
        "bits are viewed as int16 and reinterpreted as `ml_dtypes.bfloat16`. JAX needs no helper: "
        "its bfloat16 is the `ml_dtypes` dtype, so `np.array` converts any JAX array.",
        torch=("t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)",),
    ),
    "_to_torch": _n(
        "PyTorch only, the way back: `torch.from_numpy` shares memory and warns on read-only "
        "arrays (such as NumPy views of JAX arrays), so those are copied first; bfloat16 goes "
        "through an int16 view again. JAX's `jax.device_put` takes any NumPy array.",
        torch=(
            "if not a.flags.writeable:",
            "torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)",
        ),
    ),
    "_canonical_params": _n(
        "JAX only: torch gets canonical names for free from `state_dict()`. The JAX twin flattens "
        "`nnx.state(model, nnx.Param)` with `nnx.to_flat_state` and joins each path with dots: "
        "its own `Linear` and `Embedding` already use torch's leaf names.",
        jax=("nnx.to_flat_state(nnx.state(model, nnx.Param))", '".".join(map(str, path))'),
    ),
    "export_state": _n(
        "Both return the canonical state: torch's names and (out, in) layout, in the model's "
        "dtype. torch's `state_dict()` is already canonical (the KV cache is not persistent), so "
        "it only converts to NumPy; JAX copies each parameter out with `np.array`, gathered "
        "first with `sharding.gather` when it is sharded.",
        torch=("model.state_dict().items()", "_to_numpy(t)"),
        jax=("np.array(sharding.gather(p[...]))",),
    ),
    "load_state": _n(
        "torch copies in place with `copy_` under `torch.no_grad`, which also casts to the "
        "parameter's dtype. JAX arrays are immutable, so each `nnx.Param` is given a new array, "
        "`p.set_value(jax.device_put(...))`: a copy cast to the parameter's dtype and placed like "
        "the array it replaces (or, where the model holds only shapes, on the default device).",
        torch=("@torch.no_grad()", "t.copy_("),
        jax=("p.set_value(jax.device_put(np.array(state[name], dtype=p.dtype, copy=True)",),
    ),
}

_GENERATE = {
    HEADER: _n(
        "Both take the framework-free request checks and plans from `gptmod.sampling`. The JAX "
        "file also takes `Plan` and `bucket`, because its jitted functions are keyed on static "
        "shapes, and `partial` to write `jax.jit` decorators with static and donated arguments; "
        "torch imports `weakref` for the CUDA-graph caches it keeps per model.",
        torch=("from gptmod.sampling import (", "import weakref"),
        jax=(
            "from gptmod.sampling import (",
            "    Plan,",
            "    bucket,",
            "from functools import partial",
        ),
    ),
    "Knobs": _n(
        "The sampling values: Python numbers in torch, traced JAX scalars in JAX, so a new "
        "temperature or top-k never recompiles the jitted loop.",
        torch=("temperature: float",),
        jax=("temperature: jax.Array", "changing them never recompiles"),
    ),
    "_split_params": _n(
        "The same split into values (`Knobs`) and the static switches (`Flags`); JAX turns each "
        "value into a typed scalar array.",
        torch=("Knobs(*params.knob_values())",),
        jax=("jnp.float32(t), jnp.int32(k)", "jnp.asarray(eos, jnp.int32)"),
    ),
    "is_stop": _n(
        "`torch.isin` against a tensor of the stop ids vs a broadcast comparison reduced with "
        "`jnp.any`; both are masked by the static `flags.eos`.",
        torch=(
            "torch.isin(tok_B, torch.tensor(knobs.eos_ids, device=tok_B.device))",
            "& flags.eos",
        ),
        jax=("jnp.any(tok_B[:, None] == knobs.eos_ids[None], axis=-1)", "& flags.eos"),
    ),
    "filter_logits": _n(
        "The same thresholds in the same order. torch sorts with `descending=True`, JAX sorts "
        "the negated logits; torch slices the k-th value with a Python int, while JAX's `top_k` "
        "is a traced scalar, which a slice cannot take, so it uses `jnp.take_along_axis`.",
        torch=(
            "torch.sort(x_BV, dim=-1, descending=True)",
            "sorted_BV[:, knobs.top_k - 1 : knobs.top_k]",
        ),
        jax=("-jnp.sort(-x_BV, axis=-1)", "jnp.take_along_axis("),
    ),
    "argmax": _n(
        "The same result (the first maximum, NaN counted as one): torch's own `argmax` is fast, "
        "while XLA's CPU argmax is a paired reduction, so JAX spells it as a max and a min.",
        torch=("logits_BV.argmax(dim=-1)",),
        jax=("max_B1 = logits_BV.max(axis=-1, keepdims=True)", "jnp.min("),
    ),
    "sample": _n(
        "torch draws with `torch.multinomial` from a stateful `torch.Generator` it is handed; "
        "JAX draws with `jax.random.categorical` from an explicit `key`, which the caller splits "
        "anew for every step.",
        torch=("torch.multinomial(probs_BV, 1, generator=generator)",),
        jax=("jax.random.categorical(key, filter_logits(logits_BV, knobs, flags), axis=-1)",),
    ),
    "prefill": _n(
        "The same pass; torch creates the position index on the tokens' device, JAX on its "
        "default one.",
        torch=("torch.arange(tokens_BP.shape[1], device=tokens_BP.device)",),
        jax=("jnp.arange(tokens_BP.shape[1])",),
    ),
    "decode_step": _n(
        "The decode loop's body in both: feed the last tokens, sample the next. JAX splits a "
        "fresh key off the one it is given and returns both (keys are values); torch's "
        "`torch.Generator` advances in place, and `mode` picks eager or a compiled forward.",
        torch=("_step_fn(decode_one_token, mode)", "generator: torch.Generator"),
        jax=("jax.random.split(key)", "return sample(decode_one_token(model, tok_B, pos_B)"),
    ),
    "compile_mode": _n(
        "PyTorch only: torch runs eagerly unless asked, so `compile` chooses among eager, "
        "`torch.compile` and a CUDA graph (`COMPILE_MODES`). JAX has nothing to choose: every "
        "step it runs is a `jax.jit` function.",
        torch=('COMPILE_MODES = ("default", "reduce-overhead")', "raise ValueError("),
    ),
    "_device_type": _n(
        "PyTorch only: the model's device, which `_check_mode` needs; JAX has no CUDA-graph mode "
        "to check.",
        torch=("model.tok_emb.weight.device.type",),
    ),
    "_check_mode": _n(
        'PyTorch only: "reduce-overhead" captures CUDA graphs, so it is refused off CUDA rather '
        "than quietly run as plain compile.",
        torch=('mode == "reduce-overhead" and _device_type(model) != "cuda"',),
    ),
    "_step_fn": _n(
        "PyTorch only: torch compiles a function when asked (`torch.compile` with "
        "`fullgraph=True`), and this keeps one compiled step per mode, with dynamo's recompile "
        "limit raised. JAX's `jax.jit` keeps its own cache of compiled programs per static "
        "argument and shape, so no dictionary is needed.",
        torch=(
            "torch.compile(step, fullgraph=True, dynamic=False, mode=mode)",
            "_compiled[step, mode]",
            "RECOMPILE_LIMIT = 64",
        ),
    ),
    "_with_recompile_limit": _n(
        "PyTorch only: dynamo stops recompiling a function after a limit, which is raised here "
        "for these steps only (`torch._dynamo.config.patch`). jit has no such limit to raise.",
        torch=("torch._dynamo.config.patch(**{_LIMIT_NAME: limit})",),
    ),
    "_graph_step": _n(
        "PyTorch only: a CUDA-graph replay overwrites its outputs, so each step marks a new "
        "iteration and clones its logits. JAX has no CUDA graphs at this level; its whole "
        "decode loop is one XLA program (`_generate`).",
        torch=("torch.compiler.cudagraph_mark_step_begin()", ".clone()"),
    ),
    "_setup_cache": _n(
        "PyTorch only: a CUDA graph reads the cache at the addresses it was captured with, so "
        'under "reduce-overhead" each model keeps one cache per shape, zeroed in place. JAX\'s '
        "cache is an argument of the jitted step instead, donated so that XLA reuses its memory.",
        torch=("_graph_caches", "cache.k.zero_()"),
    ),
    "_prefill_step": _n(
        "JAX only: a pure function over split state, `jax.jit`ted with the cache donated: it "
        "merges the model (`nnx.merge`), runs `prefill`, and returns the new cache "
        "(`nnx.state(model, nnx.Cache)`). torch runs `prefill` on the module itself, whose "
        "cache buffers it writes in place.",
        jax=(
            'donate_argnames=("cache",)',
            "nnx.merge(graphdef, params, cache)",
            "nnx.state(model, nnx.Cache)",
        ),
    ),
    "_decode_step": _n(
        "JAX only: `decode_step` jitted on its own with the cache donated, so XLA updates it in "
        "place instead of copying it every token (`generate_stream` and Session call it). "
        "torch calls `decode_step` on the module, whose cache buffers it writes in place.",
        jax=('donate_argnames=("cache",)', "decode_step(model, tok_B, pos_B, key, knobs, flags)"),
    ),
    "generate_stream": _n(
        "torch runs under `torch.no_grad`, seeds a `torch.Generator` and writes the module's "
        "own cache, cleared in `finally` however the stream ends. JAX splits the model "
        "(`nnx.split(model, nnx.Param, nnx.Cache)`), clears the model's cache at once, and threads "
        "the cache and key through the jitted `_prefill_step` and `_decode_step`. Both loops "
        "call `decode_step` for every token after the first.",
        torch=(
            "@torch.no_grad()",
            "torch.Generator(device=device).manual_seed(seed)",
            "model.clear_cache()",
            "decode_step(model, tok_B, lens_B + i - 1, generator, knobs, flags, mode)",
        ),
        jax=(
            "nnx.split(model, nnx.Param, nnx.Cache)",
            "_prefill_step(",
            "_decode_step(",
        ),
    ),
    "_Loop": _n(
        "JAX only: the carry of the `jax.lax.while_loop` in `_generate`, a tuple of arrays (the "
        "cache among them, as pure state); torch's loop is a Python `for` over its own "
        "variables.",
        jax=("class _Loop(NamedTuple)", "cache: nnx.State"),
    ),
    "_generate": _n(
        "JAX only: all of `generate` as one jitted function: the cache is allocated inside it "
        "(nothing to copy in), the prompts are prefilled and a `jax.lax.while_loop` runs "
        "`decode_step` until every row is done. torch's `generate` simply collects "
        "`generate_stream`, a Python loop over the same step, eager or compiled.",
        jax=(
            "@partial(jax.jit, static_argnames=",
            "model.setup_cache(plan.rows, plan.cache_len)",
            "jax.lax.while_loop(cond, body",
            "decode_step(step_net, s.tok_B, pos_B, s.key, knobs, flags)",
        ),
    ),
    "_prepare": _n(
        "JAX only: the checks and padded prompts that both `generate` and `generate_stream` "
        "need; torch's `generate` goes through `generate_stream`, which does this inline.",
        jax=(
            "check_request(prompts, model.cfg, max_new_tokens, params)",
            "padded_prompts(prompts, p)",
        ),
    ),
    "generate": _n(
        "torch collects `generate_stream`; JAX splits the parameters off (`nnx.split(model, "
        "nnx.Param)`) and makes one call of the jitted `_generate`. The options differ by "
        "framework: `compile` (eager, `torch.compile` or a CUDA graph) in torch, `scan_layers` in "
        "JAX, where every call is compiled anyway.",
        torch=("steps = list(", "compile: Compile = False"),
        jax=(
            "graphdef, state = nnx.split(model, nnx.Param)",
            "_generate(",
            "scan_layers: bool = False",
        ),
    ),
    "_extend_step": _n(
        "JAX only: a `Session`'s prefill as a jitted function with the cache donated, returning "
        "the new cache; torch's `Session._extend` calls `prefill` with the session's cache "
        "installed on the module.",
        jax=('donate_argnames=("cache",)', "prefill(model, tokens_BT, lens_B, start_B)"),
    ),
    "Session": _n(
        "torch keeps the session's caches as `KVCache` modules and installs them on the model "
        "for each step; JAX keeps the cache as pure `nnx.State` beside the `_graphdef` that the "
        "jitted steps merge it into. Only torch takes `compile`.",
        torch=("self._caches: list[KVCache] = []", "compile: Compile = False"),
        jax=("self._cache: nnx.State | None = None", "self._graphdef = ("),
    ),
    "Session._stream": _n(
        "torch installs the cache for the step (`self._installed()`); JAX passes it to "
        "`_decode_step` and gets the updated, donated one back.",
        torch=("with self._installed():",),
        jax=("tok_1, self._cache, key = _decode_step(",),
    ),
    "Session._extend": _n(
        "Eager torch takes any length, so the new part goes in unpadded; JAX pads it to a "
        "`bucket`, so that new lengths reuse compilations. JAX also starts afresh when an "
        "interrupted step had taken the donated cache with it (`is_deleted`).",
        torch=("goes in unpadded",),
        jax=("bucket(len(new), self.max_len)", "x.is_deleted()"),
    ),
    "Session._reserve": _n(
        "Growing copies the old cache into the corner of the new one: an indexed assignment in "
        "torch, `jax.lax.dynamic_update_slice` in JAX.",
        torch=("getattr(new, name)[tuple(slice(0, n) for n in src.shape)] = src",),
        jax=("jax.lax.dynamic_update_slice(new, old, (0,) * old.ndim)",),
    ),
    "Session._model_free": _n(
        "PyTorch only: the session's cache goes onto the module for each step, so the module "
        "must not hold another one. JAX's jitted steps take the cache as an argument and never "
        "put it on the model.",
        torch=("if self.model.blocks[0].attn.kv_cache is not None:",),
    ),
    "Session._installed": _n(
        "PyTorch only: the session's cache on the model for one step, and off it again whatever "
        "happens; JAX has no counterpart (see `_model_free`).",
        torch=("block.attn.kv_cache = cache", "self.model.clear_cache()"),
    ),
}

_TRAIN = {
    HEADER: _n(
        "Both share the recipe and checkpoints of `gptmod.training`. torch brings its optimizer "
        "(`torch.optim`) and autograd with it; JAX takes the optimizer from `optax` and "
        "parallelism from `sharding` (a device mesh) instead of `torch.distributed`.",
        torch=("from gptmod.training import TrainConfig, decays, lr_at", "import torch\n"),
        jax=(
            "from gptmod.training import TrainConfig, decays, lr_at",
            "import optax",
            "from gptmod_jax import sharding",
        ),
    ),
    "loss_fn": _n(
        "torch writes the cross-entropy as `torch.logsumexp` minus the target's logit, because "
        "`F.cross_entropy`'s CPU log-softmax is further from float64; JAX uses "
        "`optax.softmax_cross_entropy_with_integer_labels`.",
        torch=("torch.logsumexp(logits_RV, dim=-1) - target_R", "Not `F.cross_entropy`"),
        jax=("optax.softmax_cross_entropy_with_integer_labels(logits_BTV, y_BT).mean()",),
    ),
    "make_optimizer": _n(
        "torch's `torch.optim.AdamW` decays by parameter group, and its learning rate is set "
        "from `lr_at` before each step (`Trainer.step`). optax composes the same recipe: "
        "`optax.clip_by_global_norm` chained before `optax.adamw`, whose decay `mask` names the "
        "decayed parameters and whose learning rate is the schedule itself.",
        torch=("torch.optim.AdamW(", '{"params": decay, "weight_decay": tc.weight_decay}'),
        jax=(
            "optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw)",
            "mask={n: decays(n) for n in names}",
            "optax.warmup_cosine_decay_schedule(",
        ),
    ),
    "_numpy": _n(
        "PyTorch only: a tensor to a NumPy copy, bf16 as fp32. JAX's `Trainer._canonical` does "
        "the same with `np.array`.",
        torch=("t.detach().cpu()",),
    ),
    "_ids": _n(
        "PyTorch only: token ids as int64 tensors on the model's device, which torch's indexing "
        "wants; JAX's `Trainer._batch` places the batches with `jnp.asarray` as they are.",
        torch=("torch.as_tensor(a, dtype=torch.long, device=device)",),
    ),
    "Trainer": _n(
        "torch trains the module in place: `torch.optim` holds references to its parameters. "
        "JAX splits the model (`nnx.split`) into a graph and a flat dict of fp32 parameter "
        "copies, which the jitted step takes, donates and returns, with the optax state "
        "(`tx.init`) beside them. Only torch takes `compile` (the loss through "
        "`torch.compile`); every JAX step is jitted, per Trainer: a jitted method with `self` "
        "static would keep every Trainer, and its arrays, in JAX's cache for good.",
        torch=(
            "self.optimizer = make_optimizer(model, tc)",
            "torch.compile(loss_fn) if compile else loss_fn",
        ),
        jax=(
            "nnx.split(model, nnx.Param, ...)",
            "jnp.array(v, jnp.float32, copy=True)",
            "self.tx.init(self.params)",
            "jax.jit(self._step, donate_argnums=(0, 1))",
        ),
    ),
    "Trainer._autocast": _n(
        "PyTorch only: bf16 compute under `torch.autocast` from fp32 weights; JAX casts the "
        "parameters to bf16 in `Trainer._model`, and the gradients flow back to the fp32 "
        "masters.",
        torch=("torch.autocast(device_type=device, dtype=torch.bfloat16)",),
    ),
    "Trainer._sync": _n(
        "PyTorch only: DDP and FSDP2 all-reduce gradients only on the last micro-batch. Under "
        "GSPMD the collectives are part of the compiled JAX step.",
        torch=("self.module.no_sync()", "set_requires_gradient_sync(last)"),
    ),
    "Trainer._backward": _n(
        "PyTorch only: a Python loop over micro-batches, `backward` accumulating into `.grad`. "
        "JAX computes the same mean gradient functionally in `Trainer._grads`.",
        torch=("(loss / len(x_ABT)).backward()", "self.optimizer.zero_grad(set_to_none=True)"),
    ),
    "Trainer._model": _n(
        "JAX only: the model rebuilt from the parameter dict (`nnx.merge`), cast to bf16 for "
        "bf16 compute; torch's module always holds its parameters.",
        jax=("nnx.merge(self.graphdef, state, self.rest)", "p.astype(jnp.bfloat16)"),
    ),
    "Trainer._loss": _n(
        "JAX only: the loss as a function of the parameter dict, which `jax.value_and_grad` "
        "differentiates; torch's `_loss` is an attribute set in `__init__` (the loss, maybe "
        "compiled), differentiated by autograd.",
        jax=("return loss_fn(self._model(params), x_BT, y_BT)",),
    ),
    "Trainer._grads": _n(
        "JAX only: the mean loss and gradient over the micro-batches as a `jax.lax.scan` of "
        "`jax.value_and_grad`, one function that `__init__` jits for this Trainer; torch's twin "
        "is `Trainer._backward`.",
        jax=(
            "jax.value_and_grad(self._loss)(params, *xy)",
            "jax.lax.scan(micro, zeros, (x_ABT, y_ABT))",
        ),
    ),
    "Trainer._step": _n(
        "JAX only: gradients, `tx.update` and `optax.apply_updates` in one step that `__init__` "
        "jits, donating the parameters and optimizer state so that XLA updates them in place; "
        "torch's `optimizer.step()` mutates its parameters itself.",
        jax=(
            "self.tx.update(g, opt_state, params)",
            "optax.apply_updates(params, updates)",
        ),
    ),
    "Trainer._mesh": _n(
        "JAX only: the mesh the Trainer was built under, re-entered for every step; torch's "
        "processes are set up once by torchrun.",
        jax=("sharding.use_mesh(*self.placement)",),
    ),
    "Trainer._batch": _n(
        "JAX only: a batch placed with its rows split over the mesh's batch axis; in torch each "
        "process loads its own slice.",
        jax=("sharding.shard_batch(",),
    ),
    "Trainer.grads": _n(
        "torch reads each parameter's `.grad` (gathered from FSDP shards); JAX's `_grads` "
        "returns the gradients, which are copied out under canonical names.",
        torch=("_numpy(full_tensor(p.grad))",),
        jax=("self._canonical(g)",),
    ),
    "Trainer.step": _n(
        "torch clips with `clip_grad_norm_`, sets each group's learning rate and calls "
        "`optimizer.step()`, returning Python floats. JAX makes one call of the jitted `_step` "
        "and returns the loss and norm unsynchronised, on the device.",
        torch=("torch.nn.utils.clip_grad_norm_(", 'group["lr"] = lr', "self.optimizer.step()"),
        jax=("self._step(", '"grad_norm": grad_norm'),
    ),
    "Trainer._eval": _n(
        "JAX only: the loss as a jitted function; torch evaluates eagerly under `torch.no_grad`.",
        jax=("return self._loss(params, x_BT, y_BT)",),
    ),
    "Trainer.eval_loss": _n(
        "torch switches the module to `eval()` and back and turns autograd off; a JAX function "
        "computes no gradient unless asked, and this model has no train/eval modes.",
        torch=("self.model.eval()", "self.model.train()", "@torch.no_grad()"),
        jax=("self._eval(",),
    ),
    "Trainer.model": _n(
        "JAX only: the trained model rebuilt from the parameter dict; torch's `Trainer.model` "
        "is the module itself, trained in place.",
        jax=("nnx.merge(self.graphdef, state, self.rest)",),
    ),
    "Trainer._canonical": _n(
        "JAX only: NumPy copies under canonical names (never views of buffers the step will "
        "donate), gathered first on a multi-host mesh; torch uses `_numpy` and `full_tensor` "
        "(gptmod_torch/distributed.py).",
        jax=("np.array(sharding.gather(tree[n]), dtype=np.float32)",),
    ),
    "Trainer._from_canonical": _n(
        "JAX only: canonical arrays checked and placed like the parameters they replace; torch "
        "copies into its parameters (`shard_like`).",
        jax=(
            "check_state(",
            "jax.device_put(np.array(state[n], np.float32, copy=True), self.params[n].sharding)",
        ),
    ),
    "Trainer.export_state": _n(
        "torch's module state is canonical already (`export_state` of model.py), except under "
        "FSDP, where each shard is gathered; JAX copies its parameter dict out.",
        torch=("export_state(self.model)", 'if self.parallel != "fsdp":'),
        jax=("self._canonical(self.params)",),
    ),
    "Trainer.load_state": _n(
        "torch copies into its parameters in place; JAX replaces its parameter dict.",
        torch=("load_state(self.model, state)", "p.copy_(shard_like(state[n], p))"),
        jax=("self.params = self._from_canonical(state",),
    ),
    "Trainer.export_optimizer": _n(
        "AdamW's moments are `exp_avg`/`exp_avg_sq` in torch's per-parameter state, `mu`/`nu` "
        "in optax's `ScaleByAdamState`.",
        torch=('s["exp_avg"]', 's["exp_avg_sq"]'),
        jax=("adam.mu", "adam.nu"),
    ),
    "Trainer.load_optimizer": _n(
        "torch fills each parameter's state dict (with its `step`); optax's state is immutable, "
        "so `optax.tree_utils.tree_set` builds a new one with the moments and counts replaced.",
        torch=('"step": torch.tensor(float(count))', '"exp_avg": shard_like('),
        jax=("optax.tree_utils.tree_set(self.opt_state, mu=mu, nu=nu, count=count)",),
    ),
    "Trainer.all_reduce_mean": _n(
        "The mean of a Python float over processes: an all-reduce in "
        "gptmod_torch/distributed.py vs `multihost_utils.process_allgather`.",
        torch=("distributed.all_reduce_mean(value)",),
        jax=("multihost_utils.process_allgather(np.float64(value))",),
    ),
    "_adam_state": _n(
        "JAX only: optax nests Adam's state inside the chain's, so it is found by type "
        "(`optax.ScaleByAdamState`); torch's optimizer keeps a dict per parameter.",
        jax=("isinstance(s, optax.ScaleByAdamState)",),
    ),
}

NOTES: dict[str, Note] = {
    f"{file}:{name}": note
    for file, notes in (("model.py", _MODEL), ("generate.py", _GENERATE), ("train.py", _TRAIN))
    for name, note in notes.items()
}
# Rows that need no note: the same code in both twins, or differences the diff shows plainly.
NO_NOTE: frozenset[str] = frozenset(
    {
        "model.py:rope_inv_freq",
        "generate.py:decode_one_token",
    }
)
