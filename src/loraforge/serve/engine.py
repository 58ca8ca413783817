"""Batched generation for `loraforge serve`: one worker thread takes the requests that are waiting, up to
max_batch, and generates them together with transformers' generate, rows of different runs on one base in the
same batch (PEFT's mixed adapter batches). Each row keeps its own sampling settings, seed, token limit and stop
strings; its tokens go to its request as they come. A request that is cancelled (its client left, or its time
ran out) stops its row at the next token. Requests that arrive while a batch runs wait for the next one.

A batch that fails is split in two, each half going on from the tokens its rows already have, until the row that
fails is alone: that request alone gets the error. Two halves failing alike do not make the failure the batch's:
two rows that fail alike (two bad prompts) may sit one in each half, so halves are split down to the rows that
fail."""

import contextlib
import copy
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from loraforge.eval.generate import as_trained
from loraforge.serve.models import BASE, Served

log = logging.getLogger("loraforge.serve")

HISTORY = 1000


@dataclass
class Job:
    served: Served
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    # Called from the worker thread with ("delta", text) as text comes, then ("done", finish_reason) or
    # ("error", message).
    deliver: Callable[[tuple], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    # The row's own torch.Generator, made at its first batch and kept if it goes on in another.
    generator: object = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None

    def take(self, token: int) -> None:
        """One generated token: the end of the answer, or more text. Text that may be the start of a stop string
        is held back until the next tokens show whether it is, and so is a character split across tokens."""
        if self.finish_reason is not None:
            return
        if token in self.served.stop_ids:
            self.finish("stop")
            return
        self.tokens.append(token)
        text, stopped = self._answer()
        if stopped:
            self.finish("stop")
        elif len(self.tokens) >= self.max_tokens:
            self.finish("length")
        elif not text.endswith("\ufffd"):
            self._send(text[: len(text) - _stop_prefix(text, self.stop)])

    def finish(self, reason: str) -> None:
        """The answer ends: what was held back goes out (cut before a stop string), then the reason."""
        if self.finish_reason is None:
            self._send(self._answer()[0].rstrip("\ufffd"))
            self.finish_reason = reason
            self.deliver(("done", reason))

    def _answer(self) -> tuple[str, bool]:
        """The text so far, cut before the first stop string in it, and whether there was one."""
        text = self.served.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def _send(self, text: str) -> None:
        if len(text) > len(self.text) and text.startswith(self.text):
            self.deliver(("delta", text[len(self.text):]))
            self.text = text


def _stop_prefix(text: str, stops: list[str]) -> int:
    """How many characters at the end of text begin one of the stop strings."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


class Engine:
    def __init__(self, max_batch: int = 32, gather_s: float = 0.02):
        self.max_batch, self.gather_s = max_batch, gather_s
        self.waiting: queue.Queue = queue.Queue()
        # The latest batches' sizes, and (finish reason, tokens generated) of the latest requests to end.
        self.batch_sizes: deque[int] = deque(maxlen=HISTORY)
        self.finished: deque[tuple[str, int]] = deque(maxlen=HISTORY)
        self.running = 0
        self._jobs: dict[int, Job] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="loraforge-serve-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            self._jobs[id(job)] = job
        self.waiting.put(job)

    def cancel_all(self) -> int:
        """Every request waiting or generating ends at its next token, as one whose client left; how many there were
        (a server shutting down)."""
        with self._lock:
            jobs = [job for job in self._jobs.values() if job.finish_reason is None]
        for job in jobs:
            job.cancelled.set()
        return len(jobs)

    def close(self) -> None:
        self.waiting.put(None)
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            first = self.waiting.get()
            if first is None:
                return
            jobs = [first]
            deadline = time.monotonic() + self.gather_s
            while len(jobs) < self.max_batch:
                try:
                    job = self.waiting.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if job is None:
                    self.waiting.put(None)
                    break
                jobs.append(job)
            for batch in _batches([j for j in jobs if not j.cancelled.is_set()]):
                self._run(batch)
            for job in jobs:
                job.finish("cancelled")
                self.finished.append((job.finish_reason, len(job.tokens)))
                with self._lock:
                    self._jobs.pop(id(job), None)

    def _run(self, jobs: list[Job]) -> None:
        failure = self._try(jobs)
        if failure is not None:
            self._split(jobs, failure, logged=set())

    def _try(self, jobs: list[Job]) -> Exception | None:
        """The batch generated, or what it failed with (a failed batch must not end the worker)."""
        self.batch_sizes.append(len(jobs))
        self.running = len(jobs)
        try:
            _generate(jobs)
            return None
        except Exception as exc:
            return exc
        finally:
            self.running = 0

    def _split(self, jobs: list[Job], failure: Exception, logged: set) -> None:
        """The unfinished rows of a failed batch, in two halves: a half that fails is split again; a lone row that
        fails gets the error. logged: the failures whose traceback is in the log."""
        left = _unfinished(jobs)
        if len(jobs) == 1:
            self._fail(left, failure, logged)
            return
        log.warning("a batch of %d rows failed (%s: %s); its %d unfinished rows go on in two halves",
                    len(jobs), type(failure).__name__, failure, len(left))
        for half in (left[: len(left) // 2], left[len(left) // 2 :]):
            failed = self._try(half) if half else None
            if failed is not None:
                self._split(half, failed, logged)

    def _fail(self, jobs: list[Job], failure: Exception, logged: set) -> None:
        if not jobs:
            return
        names = ", ".join(sorted({j.served.name for j in jobs}))
        if _kind(failure) in logged:
            log.error("generation failed for %d more request(s) to %s: %s: %s", len(jobs), names,
                      type(failure).__name__, failure)
        else:
            log.error("generation failed for %d request(s) to %s", len(jobs), names, exc_info=failure)
            logged.add(_kind(failure))
        for job in jobs:
            job.finish_reason = "error"
            job.deliver(("error", f"generation failed: {type(failure).__name__}: {failure}"))


def _unfinished(jobs: list[Job]) -> list[Job]:
    return [j for j in jobs if j.finish_reason is None and not j.cancelled.is_set()]


def _kind(failure: Exception) -> tuple:
    """What tells two failures apart: the same type and message are one failure, met again."""
    return type(failure), str(failure)


def _batches(jobs: list[Job]) -> list[list[Job]]:
    """Jobs of one base together (each adapter on its own where the base cannot mix adapters in a batch)."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        base = job.served.base
        key = (id(base), None if base.mixed_batches else job.served.adapter)
        groups.setdefault(key, []).append(job)
    return list(groups.values())


def _generate(jobs: list[Job]) -> None:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    base = jobs[0].served.base
    model = base.model
    pad = next((j.served.tokenizer.pad_token_id for j in jobs if j.served.tokenizer.pad_token_id is not None), 0)
    # A row that goes on from a failed batch starts from its prompt and the tokens it already has.
    prompts = [j.prompt_ids + j.tokens for j in jobs]
    width = max(map(len, prompts))
    ids = torch.full((len(jobs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    for job in jobs:
        if job.generator is None:
            job.generator = torch.Generator()
            job.generator.manual_seed(job.seed if job.seed is not None else torch.seed())

    class RowSampling(LogitsProcessor):
        """Each row's own temperature and top_p, drawn with its own seeded generator; greedy picks the draw."""

        def __call__(self, input_ids, scores):
            for row, job in enumerate(jobs):
                if job.temperature == 0 or job.finish_reason is not None:
                    continue
                logits = scores[row].double()
                # Shifted so the largest is 0, in float64: a temperature near 0 sends the rest to -inf, not inf/nan.
                probs = torch.softmax((logits - logits.max()) / job.temperature, dim=-1)
                if job.top_p < 1:
                    ordered, order = probs.sort(descending=True)
                    outside = ordered.cumsum(-1) - ordered > job.top_p
                    probs[order[outside]] = 0
                token = torch.multinomial(probs, 1, generator=job.generator)
                scores[row] = float("-inf")
                scores[row, token] = 0
            return scores

    class RowEnd(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([job.finish_reason is not None or job.cancelled.is_set() for job in jobs],
                                device=input_ids.device)

    class RowStream(BaseStreamer):
        def __init__(self):
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for job, token in zip(jobs, value.tolist()):
                job.take(token)

        def end(self):
            pass

    settings = copy.deepcopy(model.generation_config)
    settings.update(max_new_tokens=max(j.max_tokens - len(j.tokens) for j in jobs), do_sample=False, temperature=None,
                    top_p=None, top_k=None, pad_token_id=pad,
                    eos_token_id=sorted(set().union(*(j.served.stop_ids for j in jobs))))
    extra, adapters = {}, contextlib.nullcontext()
    if base.adapters and base.mixed_batches:
        extra = {"adapter_names": [j.served.adapter or BASE for j in jobs]}
    elif base.adapters:
        # DoRA layers take no adapter_names: a batch holds one run's rows (or the base's), chosen before generating.
        if jobs[0].served.adapter is None:
            adapters = model.disable_adapter()
        else:
            model.set_adapter(jobs[0].served.adapter)
    with torch.no_grad(), adapters, as_trained(model):
        model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), generation_config=settings,
                       logits_processor=LogitsProcessorList([RowSampling()]),
                       stopping_criteria=StoppingCriteriaList([RowEnd()]), streamer=RowStream(), **extra)
    for job in jobs:
        job.finish("cancelled" if job.cancelled.is_set() else "length")
