"""LMEye's released checkpoints: read them, rebuild the network they were trained in, convert them.

    checkpoint = read_released("checkpoint_with_epoch4.pth")        # checked, nothing built yet
    processor, model = from_released("checkpoint_with_epoch4.pth", llm, clip, tokenizer)   # the QA prompt
    batch = processor(["What is in the image?"], images=pixels)
    answer = processor.decode(model.generate(**batch, **GENERATION["qa"]))

    python -m lmeye_fast.models.released convert checkpoint_with_epoch4.pth \\
        --llm huggyllama/llama-7b --clip openai/clip-vit-large-patch14 --out llama7b-lmeye

Two layouts are known (docs/released.md has the whole of each):

``v1`` (LLaMA-7b, LLaMA-13b, Bloomz-7b1, instruction-tuned): CLIP's projected image vector x is
one ``<img>`` token (``imgLinear``); the request is the LLM's hidden state at the first of five
``<img-d>`` slots (there is no ``<img-q>``), one request (``llm2clip``) meets the five
sub-features of x (``promptMlp``) in CLIP's frozen text tower, and ``imgdLinear`` maps the one
result to five different slot tokens. Special rows are the LLM's word row plus a learned vector.

``v0.1`` (FlanT5-XL with BLIP-2's Q-Former, the MMBench entry): the Q-Former's 32 tokens are
prepended to the text (``language_projection``); five requests read at ``<img-q>`` meet the 32
tokens (``instruction_linear``) in one CLIP text pass, whose last five rows are transmitted by one
shared map into the five ``<img-d>`` slots.

The file is read with ``torch.load(..., weights_only=True)`` only, so it can hold tensors and
plain containers and nothing that runs code; its keys and shapes are checked before any module is
built.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .clip_interaction import CLIPTextInteraction
from .modeling import LMEyeBaseModel, LMEyeModel
from .processor import LMEyeProcessor
from .prompts import PromptTemplate, prompt_template
from .seq2seq import LMEyeSeq2SeqModel
from .vision import CLIPImageEncoder

__all__ = ["ReleasedCheckpoint", "read_released", "from_released", "QFormerImageTokens", "TEMPLATES", "GENERATION",
           "IMAGE_VECTORS", "V1_KEYS", "V01_KEYS"]

V1_KEYS = ("embedding_img", "embedding_imgd", "imgLinear.weight", "imgLinear.bias", "promptMlp.weight",
           "promptMlp.bias", "llm2clip.weight", "llm2clip.bias", "imgdLinear.weight", "imgdLinear.bias")
V01_KEYS = ("language_projection.weight", "language_projection.bias", "instruction_embedding_imgd",
            "instruction_embedding_imgq", "instruction_blip22clip.weight", "instruction_blip22clip.bias",
            "instruction_linear.weight", "instruction_linear.bias", "instruction_imgdLinear.weight",
            "instruction_imgdLinear.bias")
# Which learned vector sits at <img>: the one training used, or the one the released inference scripts
# load there (they match checkpoint keys by substring, and "embedding_img" is part of "embedding_imgd").
IMAGE_VECTORS = ("embedding_img", "embedding_imgd")
# The tokens each release adds to the LLM's tokenizer, in the order it adds them (their ids follow).
V1_TOKENS = ("<img>", "<img-d>")
V01_TOKENS = ("<img-d>", "<img-q>")
# v0.1 prepends its image tokens to the text: its <img> slots get a token of their own, since the
# prompt's literal "<img>" is text there. The processor adds it after the release's tokens.
V01_IMAGE_TOKEN = "<lmeye-image>"


# The released prompts, by what the release used them for: templates of ``PROMPT_TEMPLATES``
# (``lmeye_fast.models.prompts``), which the processor ``from_released`` returns holds and saves.
# v0.1's image tokens come before the text, in which "<img>" is a word: a template only for a processor
# whose image token is another (``from_released`` builds that one).
V01_TEMPLATE = PromptTemplate(first_turn="{image}Human: <img>\n{question}\n", response_prefix="\nAssistant:",
                              add_bos=False, name="lmeye-v0.1")
TEMPLATES: Dict[str, Union[str, PromptTemplate]] = {"qa": "lmeye-v1-qa", "instruction": "lmeye-v1-instruction",
                                                    "demo": "lmeye-v1-demo", "mmbench": V01_TEMPLATE}

# The released scripts' generation settings, as keyword arguments of ``generate``.
GENERATION: Dict[str, dict] = {
    "qa": dict(num_beams=5, max_new_tokens=100),
    "instruction": dict(num_beams=4, do_sample=True, max_new_tokens=300),
    "vqa": dict(num_beams=5, length_penalty=-1.0, max_new_tokens=50),
    "demo": dict(num_beams=5, do_sample=True, temperature=1.0, max_new_tokens=200),
    "mmbench": dict(num_beams=5, do_sample=False, max_new_tokens=16),
}


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """A released checkpoint's adapter, checked: ``state`` (keys without ``module.``) and the widths
    its shapes give. ``llm_dim`` H; ``interaction_dim`` C (CLIP's text width); ``vision_dim`` the
    image features' width (v1: CLIP's projected vector, v0.1: the Q-Former's); ``sub_features``,
    ``num_requests``, ``num_slots`` the IPN's S, R, K."""

    path: str
    layout: str
    state: Dict[str, torch.Tensor]
    llm_dim: int
    interaction_dim: int
    vision_dim: int
    sub_features: int
    num_requests: int
    num_slots: int
    epoch: Optional[int]


def _v1_widths(shapes) -> Tuple[dict, Dict[str, tuple]]:
    h, c = shapes["embedding_img"][-1], shapes["imgLinear.weight"][-1]
    s = _ratio(shapes, "promptMlp.bias", c, "the CLIP width read off imgLinear.weight")
    k = _ratio(shapes, "imgdLinear.bias", h, "the LLM width read off embedding_img")
    widths = dict(llm_dim=h, interaction_dim=c, vision_dim=c, sub_features=s, num_requests=1, num_slots=k)
    expected = {"embedding_img": (1, h), "embedding_imgd": (1, h), "imgLinear.weight": (h, c), "imgLinear.bias": (h,),
                "promptMlp.weight": (s * c, c), "promptMlp.bias": (s * c,), "llm2clip.weight": (c, h),
                "llm2clip.bias": (c,), "imgdLinear.weight": (k * h, c), "imgdLinear.bias": (k * h,)}
    return widths, expected


def _v01_widths(shapes) -> Tuple[dict, Dict[str, tuple]]:
    h, q = shapes["instruction_embedding_imgd"][-1], shapes["language_projection.weight"][-1]
    c = shapes["instruction_linear.weight"][0]
    r = _ratio(shapes, "instruction_blip22clip.bias", c, "the CLIP width read off instruction_linear.weight")
    widths = dict(llm_dim=h, interaction_dim=c, vision_dim=q, sub_features=1, num_requests=r, num_slots=r)
    expected = {"language_projection.weight": (h, q), "language_projection.bias": (h,),
                "instruction_embedding_imgd": (1, h), "instruction_embedding_imgq": (1, h),
                "instruction_blip22clip.weight": (r * c, h), "instruction_blip22clip.bias": (r * c,),
                "instruction_linear.weight": (c, q), "instruction_linear.bias": (c,),
                "instruction_imgdLinear.weight": (h, c), "instruction_imgdLinear.bias": (h,)}
    return widths, expected


LAYOUTS: Dict[str, Tuple[Tuple[str, ...], Callable]] = {"v1": (V1_KEYS, _v1_widths), "v0.1": (V01_KEYS, _v01_widths)}


def _ratio(shapes, key: str, unit: int, what: str) -> int:
    size = shapes[key][0] if len(shapes[key]) == 1 else 0
    if unit < 1 or size < unit or size % unit:
        raise ValueError(f"{key}: shape {shapes[key]} is not a multiple of {what} ({unit})")
    return size // unit


def read_released(path) -> ReleasedCheckpoint:
    """Read and check one released checkpoint (``torch.save({"net": ..., "optimizer": ..., "epoch": ...})``,
    the legacy format), building nothing.

    Loads with ``weights_only=True`` only; strips the ``module.`` prefix DDP gives the keys;
    recognises the v1 or the v0.1 key set and infers every width from the shapes. Any other key set
    is refused naming the missing and the unexpected keys (against the nearest layout), a wrong shape
    naming the key, its shape and the one the other keys imply.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not LMEye's released checkpoint (a torch.save dict with the adapter under "
                         f"'net'): torch.load(weights_only=True) cannot read it ({reason})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("net"), dict):
        found = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: not LMEye's released checkpoint: expected a dict with the adapter's tensors under "
                         f"'net' (beside 'optimizer' and 'epoch'), got {found}")
    state: Dict[str, torch.Tensor] = {}
    for key, value in payload["net"].items():
        name = key[len("module."):] if isinstance(key, str) and key.startswith("module.") else key
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            found = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{path}: 'net'[{key!r}] is {found}, expected a floating-point tensor")
        if name in state:
            raise ValueError(f"{path}: 'net' holds {name!r} both with and without the 'module.' prefix")
        state[name] = value
    layout = _layout(path, set(state))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    widths, expected = LAYOUTS[layout][1](shapes)
    wrong = [f"{k}: shape {shapes[k]}, expected {expected[k]}" for k in LAYOUTS[layout][0] if shapes[k] != expected[k]]
    if wrong:
        raise ValueError(f"{path}: the {layout} checkpoint's shapes do not agree (" + "; ".join(wrong) + ")")
    epoch = payload.get("epoch")
    return ReleasedCheckpoint(str(path), layout, state, epoch=epoch if isinstance(epoch, int) else None, **widths)


def _layout(path, keys) -> str:
    for name, (known, _) in LAYOUTS.items():
        if keys == set(known):
            return name
    nearest = max(LAYOUTS, key=lambda name: len(keys & set(LAYOUTS[name][0])))
    known = set(LAYOUTS[nearest][0])
    raise ValueError(f"{path}: its keys are neither LMEye v1's nor v0.1's; against {nearest}'s: missing "
                     f"{sorted(known - keys)}, unexpected {sorted(keys - known)}")


# ------------------------------------------------------------------ building the model

class QFormerImageTokens(nn.Module):
    """BLIP-2's image side as LMEye v0.1 reads it: the vision tower's ``last_hidden_state``, then the
    Q-Former's learned queries attending over it; returns the Q-Former's output (B, Q, Dq), the
    image tokens v0.1 maps into the LLM and decomposes for its IPN. The modules are shared, not copied.

    Build it from a Hugging Face ``Blip2Model`` / ``Blip2ForConditionalGeneration`` with
    ``from_blip2``, or from the three parts."""

    def __init__(self, vision_model: nn.Module, qformer: nn.Module, query_tokens: torch.Tensor):
        super().__init__()
        if not isinstance(query_tokens, torch.Tensor) or query_tokens.dim() != 3:
            found = tuple(query_tokens.shape) if isinstance(query_tokens, torch.Tensor) else repr(query_tokens)
            raise ValueError(f"query_tokens: expected a (1, Q, Dq) tensor, got {found}")
        self.vision_model, self.qformer = vision_model, qformer
        self.query_tokens = query_tokens if isinstance(query_tokens, nn.Parameter) else nn.Parameter(query_tokens)

    @classmethod
    def from_blip2(cls, blip2: nn.Module) -> "QFormerImageTokens":
        parts = [getattr(blip2, name, None) for name in ("vision_model", "qformer", "query_tokens")]
        if not isinstance(parts[0], nn.Module) or not isinstance(parts[1], nn.Module) or parts[2] is None:
            raise ValueError(f"blip2: expected a BLIP-2 model with vision_model, qformer and query_tokens, got "
                             f"{type(blip2).__name__}")
        return cls(*parts)

    @property
    def width(self) -> int:
        return self.query_tokens.shape[-1]

    @property
    def num_tokens(self) -> int:
        return self.query_tokens.shape[1]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self.vision_model(pixel_values=pixel_values).last_hidden_state
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        keep = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        return self.qformer(query_embeds=queries, encoder_hidden_states=image,
                            encoder_attention_mask=keep).last_hidden_state


def _release_tokens(tokenizer, tokens: Sequence[str]) -> None:
    """Add the release's tokens in its order, so that they get its ids (the tokenizer's length and on:
    the word rows a release adds to are the LLM's rows at those ids); a tokenizer that has them already
    must have them there."""
    vocab = tokenizer.get_vocab()
    present = {t: vocab[t] for t in tokens if t in vocab}
    if present:
        base = len(tokenizer) - len(tokens)
        expected = {t: base + i for i, t in enumerate(tokens)}
        if present != expected:
            raise ValueError(f"tokenizer: already has {present}; the release adds {list(tokens)} at the ids that "
                             f"follow the LLM's own tokens, so they must be {expected} (load the LLM's original "
                             "tokenizer)")
        return
    tokenizer.add_tokens(list(tokens), special_tokens=True)


def _check_width(name: str, module_width: Optional[int], saved: int, what: str) -> None:
    if module_width != saved:
        raise ValueError(f"{name}: {what} is {module_width} wide, the checkpoint's is {saved} wide")


def _clip_checks(clip: nn.Module, checkpoint: ReleasedCheckpoint, image_side: bool) -> None:
    projection = getattr(clip, "text_projection", None)
    if not isinstance(getattr(clip, "text_model", None), nn.Module) or not isinstance(projection, nn.Linear):
        raise ValueError(f"clip: expected a CLIPModel (its text tower is the interaction), got {type(clip).__name__}")
    _check_width("clip", clip.text_model.config.hidden_size, checkpoint.interaction_dim, "its text tower")
    _check_width("clip", projection.out_features, checkpoint.interaction_dim, "its text projection")
    if image_side:
        visual = getattr(clip, "visual_projection", None)
        _check_width("clip", getattr(visual, "out_features", None), checkpoint.vision_dim,
                     "its projected image vector (get_image_features)")


def from_released(path, llm: nn.Module, clip: nn.Module, tokenizer, image_vector: str = "embedding_img",
                  dtype: torch.dtype = torch.float32, vision: Optional[nn.Module] = None,
                  template: Union[str, PromptTemplate, None] = None) -> Tuple[LMEyeProcessor, LMEyeBaseModel]:
    """The processor and model that compute a released checkpoint's forward.

    Args:
        path: the released ``.pth`` file (read with ``read_released``; refused before anything is built).
        llm: v1: the LLaMA or Bloomz causal LM it was trained on; v0.1: FlanT5-XL (encoder-decoder).
        clip: the ``CLIPModel`` (``openai/clip-vit-large-patch14``): v1's image vector and, for both, the
            frozen text tower of the interaction.
        tokenizer: the LLM's own tokenizer; the release's tokens are added to it at the release's ids.
        image_vector: the learned vector at ``<img>`` (v1): ``"embedding_img"``, the trained one, or
            ``"embedding_imgd"``, the one the released inference scripts load there.
        dtype: the adapter's dtype (the file holds float16; the LLM and CLIP keep theirs).
        vision: v0.1 only: the module giving the Q-Former's tokens (``QFormerImageTokens``).
        template: the processor's prompt template: a name of ``TEMPLATES`` (``"qa"``, ``"instruction"``,
            ``"demo"`` for v1, ``"mmbench"`` for v0.1), of ``PROMPT_TEMPLATES``, or a ``PromptTemplate``;
            by default the layout's (v1 ``"qa"``, v0.1 ``"mmbench"``). v1's must have no request
            token (the request is read at the first slot), v0.1's must have one.
    Returns:
        (processor, model); the model runs either schedule of its kind (v1: ``single_pass`` default).
    """
    checkpoint = read_released(path)
    if image_vector not in IMAGE_VECTORS:
        raise ValueError(f"image_vector: expected one of {IMAGE_VECTORS}, got {image_vector!r}")
    template = prompt_template(TEMPLATES.get(template, template) if isinstance(template, str) else
                               template or TEMPLATES["qa" if checkpoint.layout == "v1" else "mmbench"])
    if template.request_token != (checkpoint.layout == "v0.1"):
        raise ValueError(f"template: {template.name!r} {'has' if template.request_token else 'has no'} request token; "
                         f"LMEye {checkpoint.layout} reads its request "
                         f"{'at <img-q>' if checkpoint.layout == 'v0.1' else 'at the first <img-d> slot'}")
    encoder_decoder = bool(getattr(getattr(llm, "config", None), "is_encoder_decoder", False))
    if encoder_decoder != (checkpoint.layout == "v0.1"):
        raise ValueError(f"llm: the checkpoint is LMEye {checkpoint.layout}, made for "
                         f"{'an encoder-decoder (FlanT5)' if checkpoint.layout == 'v0.1' else 'a causal'} LLM; "
                         f"{type(llm).__name__} is {'an encoder-decoder' if encoder_decoder else 'a causal'} LM")
    _check_width("llm", llm.get_input_embeddings().embedding_dim, checkpoint.llm_dim, "its word embedding")
    _clip_checks(clip, checkpoint, image_side=checkpoint.layout == "v1")
    if checkpoint.layout == "v1":
        if vision is not None:
            raise ValueError("vision: v1 reads CLIP's projected image vector; pass the CLIPModel as clip only")
        return _build_v1(checkpoint, llm, clip, tokenizer, image_vector, dtype, template)
    if vision is None:
        raise ValueError("vision: v0.1 needs the module giving BLIP-2's Q-Former tokens (QFormerImageTokens)")
    _check_width("vision", getattr(vision, "width", None), checkpoint.vision_dim, "its Q-Former output")
    return _build_v01(checkpoint, llm, clip, tokenizer, vision, dtype, template)


def _build_v1(checkpoint, llm, clip, tokenizer, image_vector, dtype, template):
    _release_tokens(tokenizer, V1_TOKENS)
    processor = LMEyeProcessor(tokenizer, num_image_tokens=1, num_requests=checkpoint.num_slots, template=template,
                               image_token=V1_TOKENS[0], slot_token=V1_TOKENS[1])
    config = processor.make_config(num_requests=checkpoint.num_requests, transmission="per_slot",
                                   sub_features=checkpoint.sub_features, interaction_dim=checkpoint.interaction_dim,
                                   num_heads=1, static_feature="projected", ipn_feature="projected",
                                   special_rows="add")
    interaction = CLIPTextInteraction(clip, checkpoint.num_requests, requests="separate", positions="ends")
    model = LMEyeModel(llm, config, vision=CLIPImageEncoder(clip), interaction=interaction)
    s = checkpoint.state
    _load(model, dtype, {
        "static.proj.weight": s["imgLinear.weight"], "static.proj.bias": s["imgLinear.bias"],
        "ipn.request_proj.weight": s["llm2clip.weight"], "ipn.request_proj.bias": s["llm2clip.bias"],
        "ipn.decompose_proj.weight": s["promptMlp.weight"], "ipn.decompose_proj.bias": s["promptMlp.bias"],
        "ipn.transmit_proj.weight": s["imgdLinear.weight"], "ipn.transmit_proj.bias": s["imgdLinear.bias"],
    }, (s[image_vector][0], None, s["embedding_imgd"][0]))
    return processor, model


def _build_v01(checkpoint, llm, clip, tokenizer, vision, dtype, template):
    _release_tokens(tokenizer, V01_TOKENS)
    processor = LMEyeProcessor(tokenizer, num_image_tokens=vision.num_tokens, num_requests=checkpoint.num_slots,
                               template=template, image_token=V01_IMAGE_TOKEN, request_token=V01_TOKENS[1],
                               slot_token=V01_TOKENS[0], encoder_decoder=True,
                               decoder_start_token_id=llm.config.decoder_start_token_id)
    config = processor.make_config(sub_features=1, interaction_dim=checkpoint.interaction_dim, num_heads=1,
                                   vision_dim=checkpoint.vision_dim, static_vision_dim=checkpoint.vision_dim,
                                   special_rows=["replace", "add", "add"])
    interaction = CLIPTextInteraction(clip, checkpoint.num_requests, requests="joint", positions="ends")
    model = LMEyeSeq2SeqModel(llm, config, vision=vision, interaction=interaction)
    s = checkpoint.state
    _load(model, dtype, {
        "static.proj.weight": s["language_projection.weight"], "static.proj.bias": s["language_projection.bias"],
        "ipn.request_proj.weight": s["instruction_blip22clip.weight"],
        "ipn.request_proj.bias": s["instruction_blip22clip.bias"],
        "ipn.decompose_proj.weight": s["instruction_linear.weight"],
        "ipn.decompose_proj.bias": s["instruction_linear.bias"],
        "ipn.transmit_proj.weight": s["instruction_imgdLinear.weight"],
        "ipn.transmit_proj.bias": s["instruction_imgdLinear.bias"],
    }, (None, s["instruction_embedding_imgq"][0], s["instruction_embedding_imgd"][0]))
    return processor, model


def _load(model: LMEyeBaseModel, dtype: torch.dtype, tensors: Dict[str, torch.Tensor], special) -> None:
    """Copy the release's tensors into the adapter and cast it to ``dtype``; the slot embedding and the
    vector of a token the layout lacks stay zero (the release has no such vectors). The interaction (the
    user's CLIP text tower) keeps its dtype."""
    state = model.adapter_state_dict()
    with torch.no_grad():
        for key, value in tensors.items():
            state[key].copy_(value.reshape(state[key].shape))
        model.ipn.slot_embed.zero_()
        for row, value in enumerate(special):
            model.special_embed[row] = 0 if value is None else value
    ipn = model.ipn
    for module in (model.static, ipn.request_proj, ipn.decompose_proj, ipn.transmit_proj):
        module.to(dtype)
    for param in (ipn.slot_embed, model.special_embed):
        param.data = param.data.to(dtype)


# ------------------------------------------------------------------ converter

def _convert(args) -> None:
    from transformers import AutoConfig, AutoTokenizer, CLIPModel

    from .seq2seq import model_classes

    checkpoint = read_released(args.checkpoint)  # refused before anything is downloaded or loaded
    dtype = getattr(torch, args.dtype)
    encoder_decoder = bool(getattr(AutoConfig.from_pretrained(args.llm), "is_encoder_decoder", False))
    llm = model_classes(encoder_decoder)[0].from_pretrained(args.llm, dtype=dtype)
    clip = CLIPModel.from_pretrained(args.clip, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.llm)
    vision = None
    if checkpoint.layout == "v0.1":
        if not args.blip2:
            raise SystemExit("--blip2: a v0.1 checkpoint needs BLIP-2's vision tower and Q-Former "
                             "(e.g. --blip2 Salesforce/blip2-flan-t5-xl)")
        from transformers import Blip2Model

        vision = QFormerImageTokens.from_blip2(Blip2Model.from_pretrained(args.blip2, dtype=dtype))
    processor, model = from_released(args.checkpoint, llm, clip, tokenizer, image_vector=args.image_vector,
                                     vision=vision, template=args.template)
    out = Path(args.out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    print(f"{args.checkpoint}: LMEye {checkpoint.layout} (LLM width {checkpoint.llm_dim}) written to {out}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmeye_fast.models.released",
                                     description="LMEye's released checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="write a released checkpoint as an lmeye_fast adapter directory")
    convert.add_argument("checkpoint", help="the released .pth file")
    convert.add_argument("--llm", required=True, help="the LLM it was trained on (hub id or directory)")
    convert.add_argument("--clip", required=True, help="the CLIP model (openai/clip-vit-large-patch14)")
    convert.add_argument("--out", required=True, help="the adapter directory to write")
    convert.add_argument("--tokenizer", help="the LLM's tokenizer, if not the --llm one")
    convert.add_argument("--blip2", help="v0.1: the BLIP-2 model whose vision tower and Q-Former it reads")
    convert.add_argument("--image-vector", choices=IMAGE_VECTORS, default="embedding_img",
                         help="the learned vector at <img> (default: the trained one)")
    convert.add_argument("--template", choices=sorted(TEMPLATES),
                         help="the released prompt the processor lays out (default: qa for v1, mmbench for v0.1)")
    convert.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                         help="the dtype the LLM and CLIP are loaded in for the conversion")
    args = parser.parse_args(argv)
    try:
        _convert(args)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
