"""A torch model of nanoGPT's architecture, for the parity tests and bench_gpt.py (never imported
by npcpu): the same module names, so that state dicts map one to one, and
scaled_dot_product_attention with is_causal=True. `build(torch)` returns the classes bound to the
given torch module, so that importing this file never imports torch."""

import math


def build(torch):
    nn, F = torch.nn, torch.nn.functional

    class LayerNorm(nn.Module):
        def __init__(self, n, bias):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))
            self.bias = nn.Parameter(torch.zeros(n)) if bias else None

        def forward(self, x):
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)

    class CausalSelfAttention(nn.Module):
        def __init__(self, n_embd, n_head, bias, dropout=0.0):
            super().__init__()
            self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
            self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
            self.n_head, self.dropout = n_head, dropout

        def forward(self, x):
            batch, steps, channels = x.shape
            q, k, v = self.c_attn(x).split(channels, dim=2)
            q, k, v = (t.view(batch, steps, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
            return self.c_proj(y.transpose(1, 2).reshape(batch, steps, channels))

    class MLP(nn.Module):
        def __init__(self, n_embd, bias, approximate="none"):
            super().__init__()
            self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
            self.gelu = nn.GELU(approximate=approximate)
            self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self, n_embd, n_head, bias, approximate="none"):
            super().__init__()
            self.ln_1 = LayerNorm(n_embd, bias)
            self.attn = CausalSelfAttention(n_embd, n_head, bias)
            self.ln_2 = LayerNorm(n_embd, bias)
            self.mlp = MLP(n_embd, bias, approximate)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, bias=True, tied=True):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(vocab_size, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                h=nn.ModuleList([Block(n_embd, n_head, bias) for _ in range(n_layer)]),
                ln_f=LayerNorm(n_embd, bias),
            ))
            self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
            if tied:
                self.transformer.wte.weight = self.lm_head.weight
            self.block_size = block_size
            for name, p in self.named_parameters():  # GPT-2's initialization
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                if p.dim() >= 2:
                    nn.init.normal_(p, 0.0, std)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

        def forward(self, idx):
            steps = idx.shape[1]
            x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(steps))
            for block in self.transformer.h:
                x = block(x)
            return self.lm_head(self.transformer.ln_f(x))

        @torch.no_grad()
        def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
            """nanoGPT's sampling loop: the whole cropped window recomputed for every token (no
            key/value cache); top_k=1 is greedy."""
            for _ in range(max_new_tokens):
                window = idx if idx.shape[1] <= self.block_size else idx[:, -self.block_size:]
                logits = self(window)[:, -1, :] / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
                    logits[logits < kth] = -float("inf")
                next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
                idx = torch.cat((idx, next_token), dim=1)
            return idx

    return dict(LayerNorm=LayerNorm, CausalSelfAttention=CausalSelfAttention, MLP=MLP, Block=Block,
                GPT=GPT)
