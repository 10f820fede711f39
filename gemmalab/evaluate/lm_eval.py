"""lm-evaluation-harness model type `gemmalab`: lm-eval's three request kinds over our engine.

    gemmalab-lm-eval --model gemmalab --model_args pretrained=gemma3-270m --tasks hellaswag --batch_size 16

`pretrained` is anything `gemmalab.load` accepts. Requests go through `gemmalab.evaluate.requests`, the code our
own harness uses, so a (context, continuation) pair gets the same number in both.

Registration: lm-eval 0.4.13 resolves `--model NAME` only against its in-process registry, which it fills from
its own model list; it reads no entry points. So this package declares the `lm_eval.models` entry point (which
lm-eval releases with plugin discovery, upstream PR #4013, read by themselves) and ships the `gemmalab-lm-eval`
command, which is lm-eval's own CLI after registering that entry point. In Python, importing this module
registers the name, after which `lm_eval.simple_evaluate(model="gemmalab", ...)` works.
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import entry_points

import torch
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from gemmalab.errors import GemmalabError
from gemmalab.evaluate.requests import encode_pair, generate_until
from gemmalab.inference import Engine

logger = logging.getLogger(__name__)

MODEL_NAME = "gemmalab"
DEFAULT_MAX_LENGTH = 2048  # lm-eval's HF default; a full 32K window would need 34 GB of f32 logits at 262K vocab
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF default
# gen_kwargs that tasks often pass with a value that changes nothing here; any other value is refused.
_NEUTRAL_GEN_KWARGS = {"top_p": (1.0, None), "top_k": (0, None), "num_beams": (1,), "repetition_penalty": (1.0,),
                       "max_length": None}  # None: any value (HF's total-length cap; max_gen_toks rules here)


class GemmalabLM(LM):
    """A gemmalab model as an lm-eval LM. Every sequence starts with exactly one BOS, as Gemma needs.

    Model args: pretrained (required), dtype (float32), device (cpu), batch_size (1, or "auto" for
    max_batch_size or 32), max_length (tokens the model sees per forward: min(2048, positions - 1)),
    max_gen_toks (256), add_bos_token (must be true).
    """

    def __init__(self, pretrained: str | None = None, dtype: str = "float32", device: str | None = None,
                 batch_size: int | str | None = 1, max_batch_size: int | None = None,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 add_bos_token: bool = True, **unknown) -> None:
        super().__init__()
        if unknown:
            raise GemmalabError(f"Unknown model_args for --model gemmalab: {', '.join(sorted(unknown))}. Known: "
                                "pretrained, dtype, device, batch_size, max_batch_size, max_length, max_gen_toks.")
        if not pretrained:
            raise GemmalabError("--model gemmalab needs --model_args pretrained=REF (a model directory, a .gguf "
                                "file or a registered name such as gemma3-270m).")
        if add_bos_token in (False, "False", "false"):
            raise GemmalabError("add_bos_token=False is not supported: Gemma needs a BOS (lm-eval PR #1465).")
        device = str(device or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise GemmalabError(f"device={device} was asked for, but torch sees no CUDA device.")
        import gemmalab

        model, tokenizer = gemmalab.load(pretrained, dtype=dtype, device=device)
        if tokenizer is None:
            raise GemmalabError(f"Model {pretrained!r} has no tokenizer (tokenizer.model), which lm-eval needs.")
        self.pretrained, self.tokenizer, self._device = str(pretrained), tokenizer, torch.device(device)
        self._batch_size = _batch_size(batch_size, max_batch_size)
        positions = model.config.max_seq_len
        # The engine feeds a scored sequence whole, one token more than the model sees in lm-eval's terms.
        self._max_length = int(max_length) if max_length is not None else min(DEFAULT_MAX_LENGTH, positions - 1)
        if not 2 <= self._max_length <= positions - 1:
            raise GemmalabError(f"max_length={max_length} must be in [2, {positions - 1}] for this model "
                                f"({positions} positions, one kept for the scored token).")
        self.max_gen_toks = int(max_gen_toks)
        self.engine = Engine(model, tokenizer, max_batch_size=self._batch_size)

    # lm-eval passes --batch_size and --device next to model_args; an explicit model_arg wins over the CLI's
    # defaults instead of failing with "multiple values for keyword argument".
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> GemmalabLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> GemmalabLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        cli_device = str(extra.get("device", ""))
        if "device" not in arg_dict and cli_device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes --device cuda:0 unless told otherwise; its HF model falls back to the CPU too
            logger.warning("No CUDA device: running on the CPU instead of %s.", extra.pop("device"))
        return cls(**{**extra, **arg_dict})

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return f"gemmalab:{self.pretrained}"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The Gemma dialogue as text; it starts with <bos>, which encoding keeps single."""
        return self.tokenizer.render_chat(chat_history, add_generation_prompt)

    def get_model_info(self) -> dict:
        return {"model_name": self.pretrained, "max_length": self.max_length}

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """log p(continuation | context), and whether greedy decoding gives it, per request.

        The steps of `requests.loglikelihoods` (encode_pair, then Engine.score), plus lm-eval's truncation of
        an over-long context from the left; here BOS stays first.
        """
        pairs = [self._fit(encode_pair(self.tokenizer, *req.args), i) for i, req in enumerate(requests)]
        scored = [i for i, (_, cont) in enumerate(pairs) if cont]
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)  # an empty continuation: log 1
        for i, s in zip(scored, self.engine.score([pairs[i] for i in scored], self.batch_size)):
            results[i] = (s.logprob, s.is_greedy)
        for req, r in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, r)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text), every token predicted once, in windows of max_length tokens.

        The text is encoded without BOS and BOS is the prefix of the first window, so the first token is
        predicted from BOS alone (lm-eval's HF model adds a second BOS there: issue #3333).
        """
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, req in enumerate(requests):
            ids = self.tokenizer.encode(req.args[0], bos=False)
            for w in get_rolling_token_windows(ids, self.tokenizer.bos_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(requests)  # an empty text has no tokens to predict
        for i, s in zip(owner, self.engine.score(windows, self.batch_size)):
            totals[i] += s.logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Text after each context until a stop string (`until`), <eos>/<end_of_turn>, or max_gen_toks."""
        groups: dict[tuple, list[int]] = {}  # requests that share their settings go to the engine together
        for i, req in enumerate(requests):
            groups.setdefault(self._generation_settings(req.args[1], i), []).append(i)
        results: list[str] = [""] * len(requests)
        for (stop, max_new, temperature, seed), members in groups.items():
            prompts = [self._prompt(requests[i].args[0], max_new) for i in members]
            order = sorted(range(len(members)), key=lambda k: -len(prompts[k]))  # similar lengths pad less
            # Id lists, not text: the engine takes them as they are, and a cut prompt keeps its BOS.
            texts = generate_until(self.engine, [prompts[k] for k in order], stop, max_new, temperature, seed)
            for k, text in zip(order, texts):
                results[members[k]] = text
        for req, text in zip(requests, results):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return results

    # ---- helpers ----------------------------------------------------------------------------------------

    def _fit(self, pair: tuple[list[int], list[int]], index: int) -> tuple[list[int], list[int]]:
        """Drop the oldest context tokens after BOS until the model sees at most max_length tokens."""
        context, continuation = pair
        excess = len(context) + len(continuation) - 1 - self.max_length
        if excess <= 0:
            return pair
        if len(continuation) >= self.max_length:
            raise GemmalabError(f"Request {index}: the continuation alone has {len(continuation)} tokens, more "
                                f"than max_length={self.max_length} allows.")
        return context[:1] + context[1 + excess:], continuation

    def _prompt(self, context: str, max_new: int) -> list[int]:
        """The context's ids, cut from the left (after BOS) so that it plus max_new fits in max_length."""
        ids = self.tokenizer.encode(context, bos=True)
        room = self.max_length - max_new
        if room < 2:
            raise GemmalabError(f"max_gen_toks={max_new} leaves no room for a prompt in max_length={self.max_length}.")
        return ids if len(ids) <= room else ids[:1] + ids[len(ids) - room + 1:]

    def _generation_settings(self, gen_kwargs: dict | None, index: int) -> tuple:
        """(stop strings, max new tokens, temperature, seed) from lm-eval's gen_kwargs."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or ()
        stop = (until,) if isinstance(until, str) else tuple(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = kwargs.pop("do_sample", None)
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        seed = kwargs.pop("seed", None)
        if do_sample is False:
            temperature = 0.0  # lm-eval/HF: greedy whatever the temperature
        elif do_sample and temperature == 0.0:
            temperature = 1.0  # HF's default temperature when sampling
        for key, value in kwargs.items():
            neutral = _NEUTRAL_GEN_KWARGS.get(key, ())
            if neutral is not None and value not in neutral:
                raise GemmalabError(f"Request {index}: generation setting {key}={value!r} is not supported by "
                                    "--model gemmalab (supported: until, max_gen_toks, do_sample, temperature, seed).")
        if max_new < 1:
            raise GemmalabError(f"Request {index}: max_gen_toks must be >= 1, got {max_new}.")
        return stop, max_new, temperature, None if seed is None else int(seed)


def _batch_size(batch_size: int | str | None, max_batch_size: int | None) -> int:
    """lm-eval's batch size ("16", 16, "auto", "auto:4"); auto means max_batch_size, else 32."""
    if batch_size is None:
        return 1
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        return int(max_batch_size or 32)  # no probing: Engine.score already caps its logits memory
    try:
        size = int(batch_size)
    except ValueError:
        raise GemmalabError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}.") from None
    if size < 1:
        raise GemmalabError(f"batch_size must be >= 1, got {size}.")
    return size


def register() -> None:
    """Make `gemmalab` an lm-eval model name in this process (idempotent)."""
    # lm-eval's own names first: get_model loads them only while the registry is still empty.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=GemmalabLM)


def main(argv: list[str] | None = None) -> None:
    """`gemmalab-lm-eval`: lm-eval's CLI, with the installed `lm_eval.models` entry points registered first,
    as lm-eval releases with plugin discovery do themselves. Arguments are lm-eval's."""
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.api.registry import model_registry

    import lm_eval.models  # noqa: F401  see register(); gemmalab itself is registered by this module's import
    for ep in entry_points(group="lm_eval.models"):
        if ep.name not in model_registry:
            model_registry.register(ep.name, target=ep.value)  # a lazy "module:Class" placeholder
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except GemmalabError as e:  # bad model_args or model: a message, not a traceback (as `gemmalab` does)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # python -m gemmalab.evaluate.lm_eval: run the importable module's main and class
    from gemmalab.evaluate.lm_eval import main as _main

    _main()
else:
    register()
