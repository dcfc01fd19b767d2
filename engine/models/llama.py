"""The Llama-family forward (Llama / SmolLM2, Mistral, Qwen2 with qkv bias, Qwen3 with q/k norm)
over packed variable-length batches and the paged KV pool.

Weights come from a transformers state dict. A layer is a handful of calls: the residual adds,
SiLU and the gate product run inside the GEMMs as oneDNN post-ops (bf16 on CPU), RoPE rotates
q and k in one pass, and attention lives in engine.attention. Every op saved is saved 30 times
a step: at batch 1 on a 2-core CPU the step was bound by per-op overhead, not arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.attention import AttentionMetadata, attend, write_kv
from engine.cpu_kernels import cpu_kernels_available, row_top_k
from engine.quantization import Linear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# bf16 logits keep about 3 significant digits: at SmolLM2's (about 25) a step is 0.125, so the
# leading candidates tie and greedy decoding flips on rounding ("The" and "L" both 25.25 for
# the README's question; 25.260 and 25.249 computed in fp32). The top few are recomputed in
# fp32 from the same bf16 operands.
REFINED_LOGITS = 4


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as transformers' LlamaRMSNorm, so fp32 outputs match it token for token.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
    return weight * x32.to(x.dtype)


class LlamaForCausalLM:
    def __init__(self, config: PretrainedConfig, state_dict: dict[str, torch.Tensor],
                 dtype: torch.dtype, device: str, quantization: str = "none",
                 max_quantized_rows: int = 8, head_quantization: str = "none",
                 activation_quantization: str = "none"):
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {config.model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        self.config = config
        self.dtype, self.device = dtype, device
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.vocab_size = config.vocab_size
        self.max_model_len = config.max_position_embeddings
        self._linear_options = dict(quantization=quantization,
                                    max_quantized_rows=max_quantized_rows,
                                    activation_quantization=activation_quantization)
        self._head_options = dict(quantization=head_quantization,
                                  max_quantized_rows=max_quantized_rows)
        self._load(state_dict)
        self.cos_table, self.sin_table = self._rope_tables()
        # bf16 on CPU: RMSNorm and RoPE as one op each (engine/csrc/fused_ops.cpp). fp32 keeps
        # the ATen forms, whose outputs match transformers token for token.
        self.uses_fused_ops = (torch.device(device).type == "cpu" and dtype == torch.bfloat16
                               and cpu_kernels_available())

    def _linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
        return Linear(weight, bias, **self._linear_options)

    def _load(self, sd: dict[str, torch.Tensor]) -> None:
        def take(name: str) -> torch.Tensor:
            return sd[name].to(device=self.device, dtype=self.dtype).contiguous()

        def maybe(name: str) -> torch.Tensor | None:
            return take(name) if name in sd else None

        self.embed = take("model.embed_tokens.weight")
        tied = "lm_head.weight" not in sd or self.config.tie_word_embeddings
        # The head stays bf16: int4 there raised SmolLM2's perplexity on tests/engine/data by
        # 3.4%, and int8 was no faster (3.05 ms against 2.75 ms at one row, Zen 4, 2 threads)
        # while its error flipped the first token of the README's chat answer.
        self.lm_head = Linear(self.embed if tied else take("lm_head.weight"),
                              **self._head_options)
        self.final_norm = take("model.norm.weight")
        self.layers = []
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            attn = p + "self_attn."
            biases = [maybe(attn + f"{n}_proj.bias") for n in "qkv"]
            self.layers.append({
                "input_norm": take(p + "input_layernorm.weight"),
                "post_norm": take(p + "post_attention_layernorm.weight"),
                "qkv": self._linear(torch.cat([take(attn + f"{n}_proj.weight") for n in "qkv"]),
                                    torch.cat(biases) if biases[0] is not None else None),
                "o": self._linear(take(attn + "o_proj.weight")),
                "gate": self._linear(take(p + "mlp.gate_proj.weight")),
                "up": self._linear(take(p + "mlp.up_proj.weight")),
                # int8 activations here alone raised SmolLM2's perplexity by 3.8% (the input,
                # SiLU(gate) * up, has outlier channels; every other layer together: 0.7%).
                "down": Linear(take(p + "mlp.down_proj.weight"), **{
                    **self._linear_options, "activation_quantization": "none"}),
                "q_norm": maybe(attn + "q_norm.weight"),
                "k_norm": maybe(attn + "k_norm.weight"),
            })

    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and a signed sin, so that rotate_half(x) * sin == swap_halves(x) * signed_sin."""
        params = getattr(self.config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            theta = params.get("rope_theta", getattr(self.config, "rope_theta", 10000.0))
            steps = torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim
            inv_freq, scaling = 1.0 / (theta ** steps), 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](self.config, "cpu")
        positions = torch.arange(self.max_model_len, dtype=torch.float)
        freqs = torch.outer(positions, inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin() * scaling
        half = self.head_dim // 2
        sin[:, :half] = -sin[:, :half]
        to = dict(device=self.device, dtype=self.dtype)
        return (emb.cos() * scaling).to(**to), sin.to(**to)

    def kv_cache_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def allocate_kv_cache(self, num_slots: int) -> torch.Tensor:
        """[layers, 2 * kv_heads * slots, head_dim]: row (c * kv_heads + h) * slots + slot, so
        each (k|v, head) plane is slot-indexed and a block is ``block_size`` consecutive rows."""
        return torch.zeros(self.num_layers, 2 * self.num_kv_heads * num_slots, self.head_dim,
                           dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor, logits_index: torch.Tensor) -> torch.Tensor:
        """Float32 logits for the ``logits_index`` rows of the packed batch."""
        x = F.embedding(input_ids, self.embed)
        for layer, pool in zip(self.layers, kv_cache, strict=True):
            h = self._attention(self._norm(x, layer["input_norm"]), layer, pool, meta)
            x = layer["o"].add(h, x)
            h = self._norm(x, layer["post_norm"])
            x = layer["down"].add(layer["up"].mul(h, layer["gate"].silu(h)), x)
        x = self._norm(x[logits_index], self.final_norm)
        logits = self.lm_head(x).float()
        if self.dtype != torch.float32:
            top = row_top_k(logits, REFINED_LOGITS)[1]
            exact = torch.einsum("rd,rkd->rk", x.float(), self.lm_head.weight[top].float())
            logits.scatter_(1, top, exact)
        return logits

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.uses_fused_ops:
            return torch.ops.genq.rms_norm(x, weight, self.eps)
        return rms_norm(x, weight, self.eps)

    def _attention(self, h: torch.Tensor, layer: dict, pool: torch.Tensor,
                   meta: AttentionMetadata) -> torch.Tensor:
        num_tokens, dim = h.shape[0], self.head_dim
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = layer["qkv"](h).view(num_tokens, heads + 2 * kv_heads, dim)
        if self.uses_fused_ops and layer["q_norm"] is None:  # q and k rotated inside qkv
            torch.ops.genq.rope_store_(qkv, meta.cos, meta.sin, pool, meta.slots, heads,
                                       kv_heads)
            q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
        else:
            if layer["q_norm"] is not None:
                q = rms_norm(qkv[:, :heads], layer["q_norm"], self.eps)
                k = rms_norm(qkv[:, heads:heads + kv_heads], layer["k_norm"], self.eps)
                qk = torch.cat((q, k), dim=1)
            else:
                qk = qkv[:, :heads + kv_heads]
            half = dim // 2
            swapped = torch.cat((qk[..., half:], qk[..., :half]), dim=-1)
            qk = qk * meta.cos + swapped * meta.sin
            q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads:]
            write_kv(pool, k, v, meta)
        return attend(q, k, v, pool, meta, self.scale).view(num_tokens, heads * dim)
