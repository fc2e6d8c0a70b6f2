"""LMEye as the lmms-eval model ``lmeye`` (``pip install -e ".[eval]"``).

    python -m lmms_eval --model lmeye --tasks mmbench_en_dev --batch_size 8 --model_args adapter=ADAPTER_DIR

Model arguments: ``adapter`` (required: the directory records the LLM, the vision model
and the processor with its prompt template, ``lmeye_fast.eval.load_eval_model``), and to
read those from elsewhere ``llm``, ``llm_revision``, ``vision``, ``vision_revision``,
``tokenizer``, ``image_processor``; ``response_prefix`` and ``prompt_template`` (which must
agree with the saved processor), ``dtype``, ``schedule``, ``max_new_tokens`` (default for
tasks that set none); ``batch_size`` and
``device`` come from lmms-eval's own options. The installed package registers
the model through lmms-eval's ``lmms_eval.models`` entry point; ``register()``
does it by hand (a source checkout that is not installed).

Each context is a question laid out by the adapter's prompt template (``LMEyeProcessor.row``,
the function training lays its records out with; LLaVA's ``<image>`` tag in it is the image's).
``loglikelihood`` groups the requests that share a context and a document
(the options of one multiple-choice question) and scores each group on one
shared prefix (for an encoder-decoder LLM, on one encoding of the question:
``load_eval_model`` reads which kind the adapter was saved for). It returns the summed negative log-likelihood of each
continuation, the loss: lmms-eval's multiple-choice scoring takes the argmin of
what models return (and its bundled models return losses).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm.auto import tqdm

from .eval import load_eval_model

__all__ = ["LMEye", "MANIFEST", "register"]

MANIFEST = ModelManifest(model_id="lmeye", simple_class_path="lmeye_fast.lmms_eval_model.LMEye")


def register() -> None:
    """Make ``lmeye`` known to lmms-eval in this process (the entry point does it for an installed package)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(MANIFEST, overwrite=True)


class LMEye(lmms):
    """lmms-eval's ``lmms`` interface over ``lmeye_fast.eval.EvalModel``: batched, one image per document."""

    is_simple = True

    def __init__(self, adapter: str, llm: Optional[str] = None, vision: Optional[str] = None,
                 tokenizer: Optional[str] = None, image_processor: Optional[str] = None,
                 response_prefix: Optional[str] = None, prompt_template: Optional[str] = None,
                 llm_revision: Optional[str] = None, vision_revision: Optional[str] = None, dtype: str = "float32",
                 schedule: Optional[str] = None, max_new_tokens: int = 32, batch_size=1, device: Optional[str] = None,
                 max_batch_size: Optional[int] = None):
        super().__init__()
        del max_batch_size  # lmms-eval passes it to every model; batches here are batch_size questions
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.runner = load_eval_model(adapter, llm, vision, tokenizer, image_processor,
                                      None if response_prefix is None else str(response_prefix), device, dtype,
                                      schedule, prompt_template, llm_revision, vision_revision)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    def _image(self, doc_to_visual, doc_id, task, split):
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if len(visuals) != 1:
            raise ValueError(f"lmeye: task {task!r}, document {doc_id}: LMEye reads exactly one image per "
                             f"question, the task gives {len(visuals)}")
        return visuals[0]

    def loglikelihood(self, requests: List[Instance]) -> List[Tuple[float, bool]]:
        groups: Dict[tuple, List[int]] = {}
        for index, request in enumerate(requests):
            context, _, _, doc_id, task, split = request.args
            groups.setdefault((context, doc_id, task, split), []).append(index)
        results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
        keys = list(groups)
        for start in tqdm(range(0, len(keys), self.batch_size), desc="lmeye loglikelihood",
                          disable=self.rank != 0):
            chunk = keys[start:start + self.batch_size]
            prompts, images, options = [], [], []
            for context, doc_id, task, split in chunk:
                members = [requests[i].args for i in groups[(context, doc_id, task, split)]]
                prompts.append(context)
                images.append(self._image(members[0][2], doc_id, task, split))
                # The processor encodes an answer on its own after the response prefix, as in
                # training, so the word boundary lmms-eval puts in front of it is dropped.
                options.append([(target if isinstance(target, str)
                                 else target(self.task_dict[task][split][doc_id])).lstrip()
                                for _, target, *_ in members])
            scores = self.runner.score(prompts, images, options)
            for key, summed, greedy in zip(chunk, scores.summed, scores.greedy):
                for index, value, is_greedy in zip(groups[key], summed.tolist(), greedy.tolist()):
                    results[index] = (-value, bool(is_greedy))
        return results

    def generate_until(self, requests: List[Instance]) -> List[str]:
        by_settings: Dict[str, List[int]] = {}
        for index, request in enumerate(requests):
            by_settings.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        results: List[Optional[str]] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="lmeye generate", disable=self.rank != 0)
        for indices in by_settings.values():
            settings = dict(requests[indices[0]].args[1])
            until = settings.pop("until", [])
            until = [until] if isinstance(until, str) else list(until)
            max_new_tokens = int(settings.pop("max_new_tokens", self.max_new_tokens))
            temperature = float(settings.pop("temperature", 0) or 0)
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                args = [requests[i].args for i in chunk]
                texts = self.runner.generate([a[0] for a in args],
                                             [self._image(a[2], a[3], a[4], a[5]) for a in args],
                                             max_new_tokens, **sampling)
                for index, text in zip(chunk, texts):
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    results[index] = text
                bar.update(len(chunk))
        bar.close()
        return results

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("lmeye: multi-round generation is not supported; use single-turn tasks")
