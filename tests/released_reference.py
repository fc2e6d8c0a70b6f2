"""LMEye's released forward passes, written from the description of the releases and nothing of
``lmeye_fast``: two full LLM passes over one unpadded prompt at a time (as the released scripts run
them), the special tokens found by comparing ids, and CLIP's text pass computed by hand from the
weights of CLIP's modules (layer norms, attention projections, MLP), not through its forward.

Also what the tests need to write checkpoints the way the release writes them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

V1_SHAPES = {"embedding_img": ("1", "H"), "embedding_imgd": ("1", "H"), "imgLinear.weight": ("H", "C"),
             "imgLinear.bias": ("H",), "promptMlp.weight": ("5C", "C"), "promptMlp.bias": ("5C",),
             "llm2clip.weight": ("C", "H"), "llm2clip.bias": ("C",), "imgdLinear.weight": ("5H", "C"),
             "imgdLinear.bias": ("5H",)}
V01_SHAPES = {"language_projection.weight": ("H", "Q"), "language_projection.bias": ("H",),
              "instruction_embedding_imgd": ("1", "H"), "instruction_embedding_imgq": ("1", "H"),
              "instruction_blip22clip.weight": ("5C", "H"), "instruction_blip22clip.bias": ("5C",),
              "instruction_linear.weight": ("C", "Q"), "instruction_linear.bias": ("C",),
              "instruction_imgdLinear.weight": ("H", "C"), "instruction_imgdLinear.bias": ("H",)}


def release_state(shapes, std=0.5, **widths):
    """Random float16 tensors with the release's key names and shapes (widths: H, C, Q)."""
    def size(symbol):
        if symbol[0].isdigit() and len(symbol) > 1:
            return int(symbol[:-1]) * widths[symbol[-1]]
        return int(symbol) if symbol.isdigit() else widths[symbol]
    return {key: (torch.randn(*[size(s) for s in dims]) * std).half() for key, dims in shapes.items()}


def write_release(path, state, module_prefix=False, epoch=4):
    """``torch.save`` as the release saves: fp16 parameters under "net", the AdamW state of seven of
    them in fp32, the epoch, in the legacy (non-zip) format."""
    params = [torch.nn.Parameter(v.float()) for v in list(state.values())[:7]]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    with torch.enable_grad():
        sum(p.square().sum() for p in params).backward()
    optimizer.step()
    net = {("module." if module_prefix else "") + k: v for k, v in state.items()}
    torch.save({"net": net, "optimizer": optimizer.state_dict(), "epoch": epoch}, path,
               _use_new_zipfile_serialization=False)
    return path


# ------------------------------------------------------------------ CLIP's text pass by hand

def clip_text_rows(clip, rows):
    """CLIP's text transformer over ``rows`` (B, L, C) as given (no embeddings added), causal, then its
    final layer norm: (B, L, C). Every layer by hand from its modules' weights."""
    text = clip.text_model
    hidden = rows
    length = rows.shape[1]
    causal = torch.full((length, length), float("-inf"), dtype=rows.dtype).triu(1)
    for layer in text.encoder.layers:
        attn = layer.self_attn
        x = F.layer_norm(hidden, hidden.shape[-1:], layer.layer_norm1.weight, layer.layer_norm1.bias,
                         layer.layer_norm1.eps)
        heads = text.config.num_attention_heads
        def split(t):
            return t.reshape(t.shape[0], length, heads, -1).transpose(1, 2)
        q = split(F.linear(x, attn.q_proj.weight, attn.q_proj.bias))
        k = split(F.linear(x, attn.k_proj.weight, attn.k_proj.bias))
        v = split(F.linear(x, attn.v_proj.weight, attn.v_proj.bias))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + causal, dim=-1)
        merged = (weights @ v).transpose(1, 2).reshape(x.shape)
        hidden = hidden + F.linear(merged, attn.out_proj.weight, attn.out_proj.bias)
        x = F.layer_norm(hidden, hidden.shape[-1:], layer.layer_norm2.weight, layer.layer_norm2.bias,
                         layer.layer_norm2.eps)
        fc1, fc2 = layer.mlp.fc1, layer.mlp.fc2
        inner = F.linear(x, fc1.weight, fc1.bias)
        inner = inner * torch.sigmoid(1.702 * inner)  # CLIP's quick GELU
        hidden = hidden + F.linear(inner, fc2.weight, fc2.bias)
    norm = text.final_layer_norm
    return F.layer_norm(hidden, hidden.shape[-1:], norm.weight, norm.bias, norm.eps)


def clip_ends_sequence(clip, middle):
    """[start-of-text + position 0; ``middle`` (B, M, C) without positions; end-of-text + the last position]."""
    config = clip.text_model.config
    token, position = clip.text_model.embeddings.token_embedding.weight, \
        clip.text_model.embeddings.position_embedding.weight
    last = middle.shape[1] + 1
    batch = middle.shape[0]
    start = (token[config.bos_token_id] + position[0]).expand(batch, 1, -1)
    end = (token[config.eos_token_id] + position[last]).expand(batch, 1, -1)
    return torch.cat([start, middle, end], dim=1)


def text_projection(clip, rows):
    return F.linear(rows, clip.text_projection.weight)


# ------------------------------------------------------------------ v1

def v1_forward(state, llm, clip, ids, pixels, img_id, imgd_id, image_vector="embedding_img"):
    """v1 on one unpadded prompt (1, T): the input embeddings of pass 2 (1, T, H). ``state`` float32."""
    s = state
    x = clip.get_image_features(pixel_values=pixels)
    x = getattr(x, "pooler_output", x)  # (1, C)
    words = llm.get_input_embeddings()(ids)
    is_img, is_imgd = ids[0] == img_id, ids[0] == imgd_id
    first = words.clone()
    first[0, is_img] += F.linear(x, s["imgLinear.weight"], s["imgLinear.bias"]) + s[image_vector]
    first[0, is_imgd] += s["embedding_imgd"]
    hidden = llm.base_model(inputs_embeds=first).last_hidden_state
    request = F.linear(hidden[0, is_imgd][:1], s["llm2clip.weight"], s["llm2clip.bias"])  # the first <img-d>
    sub = F.linear(x, s["promptMlp.weight"], s["promptMlp.bias"]).view(1, 5, -1)
    rows = clip_text_rows(clip, clip_ends_sequence(clip, torch.cat([sub, request[:, None]], dim=1)))
    c = text_projection(clip, rows[:, -1])
    tokens = F.linear(c, s["imgdLinear.weight"], s["imgdLinear.bias"]).view(5, -1)
    second = first.clone()
    second[0, is_imgd] += tokens
    return second


def v1_logits(state, llm, clip, ids, pixels, img_id, imgd_id, **kw):
    return llm(inputs_embeds=v1_forward(state, llm, clip, ids, pixels, img_id, imgd_id, **kw)).logits


# ------------------------------------------------------------------ v0.1

def v01_encoder_input(state, t5, clip, qformer_tokens, ids, imgd_id, imgq_id):
    """v0.1 on one unpadded prompt (1, T): the encoder input of pass 2 (1, 32 + T, H)."""
    s = state
    words = t5.get_input_embeddings()(ids)
    image = F.linear(qformer_tokens, s["language_projection.weight"], s["language_projection.bias"])
    first = torch.cat([image, words], dim=1)
    marks = torch.cat([torch.zeros(qformer_tokens.shape[1], dtype=ids.dtype), ids[0]])
    first[0, marks == imgd_id] += s["instruction_embedding_imgd"]
    first[0, marks == imgq_id] += s["instruction_embedding_imgq"]
    hidden = t5.get_encoder()(inputs_embeds=first).last_hidden_state
    requests = F.linear(hidden[0, marks == imgq_id], s["instruction_blip22clip.weight"],
                        s["instruction_blip22clip.bias"]).view(1, 5, -1)
    sub = F.linear(qformer_tokens, s["instruction_linear.weight"], s["instruction_linear.bias"])
    rows = clip_text_rows(clip, clip_ends_sequence(clip, torch.cat([sub, requests], dim=1)))
    c = text_projection(clip, rows[:, -5:])  # the last five rows, as v0.1 reads them
    tokens = F.linear(c, s["instruction_imgdLinear.weight"], s["instruction_imgdLinear.bias"]).view(5, -1)
    second = first.clone()
    second[0, marks == imgd_id] += tokens
    return second


def qformer_tokens(blip2, pixels):
    """BLIP-2's Q-Former output on ``pixels``, through transformers' own modules."""
    image = blip2.vision_model(pixel_values=pixels).last_hidden_state
    queries = blip2.query_tokens.expand(image.shape[0], -1, -1)
    return blip2.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
