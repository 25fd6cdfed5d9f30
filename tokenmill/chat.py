"""A chat conversation with a model: history, context trimming, amnesia, undo/retry and JSON save/load. No terminal I/O.

Each turn renders the system prompt and as much of the history as fits `max_context` (minus the reply reserve,
`max_new_tokens`) through the chat template and streams the reply with `LLM.stream`, which reuses the KV-cached
prefix of the previous turn, so only the new tokens are computed. When the history does not fit, the oldest
user/assistant exchanges are left out of the prompt (never the system prompt); they stay in the transcript.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tokenmill.errors import InvalidRequestError
from tokenmill.formats.prompt_check import Finding, check_prompt
from tokenmill.sampling.params import SamplingParams
from tokenmill.engine.sequence import Completion


@dataclass
class Turn:
    """What the model is given for one reply."""

    messages: list[dict]  # system + the exchanges that fit + the user message
    prompt: str  # the rendered prompt
    ids: list[int]
    left_out: int  # oldest exchanges of the transcript not in this prompt
    findings: list[Finding] = field(default_factory=list)  # prompt-format check (the session's first turn only)


class Reply:
    """One streaming reply. Iterating yields its text; once exhausted or closed (Ctrl-C), the exchange is in the
    session's history with whatever text was generated."""

    def __init__(self, session: "ChatSession", turn: Turn, user: str, stream, t0: float, replace: bool):
        self.session, self.turn, self.user, self.replace = session, turn, user, replace
        self.completion: Completion | None = None
        self.seconds = 0.0  # end to end: from send() to the last token
        self._stream, self._t0, self._done = stream, t0, False
        self._gen = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._gen

    @property
    def text(self) -> str:
        return self.completion.text if self.completion else ""

    @property
    def interrupted(self) -> bool:
        return self.completion is None or self.completion.finish_reason == "aborted"

    def close(self):
        """Stop generating; the partial reply is kept in the history."""
        self._gen.close()
        self._commit()

    def _run(self) -> Iterator[str]:
        try:
            yield from self._stream
        finally:
            self._commit()

    def _commit(self):
        if self._done:
            return
        self._done = True
        self.completion = self._stream.completion
        self.seconds = time.perf_counter() - self._t0
        self.session._record(self)


class ChatSession:
    """A conversation with `llm`.

    Args:
        llm: a loaded `LLM`.
        sampling: sampler settings; `max_new_tokens` is the room reserved for each reply.
        system: the system prompt (None: the template's default, if any).
        max_context: tokens of prompt + reply at most (default: the model's context).
        amnesia: every turn starts from the system prompt alone; the transcript is still kept.
    """

    def __init__(self, llm, sampling: SamplingParams | None = None, *, system: str | None = None,
                 max_context: int | None = None, amnesia: bool = False):
        self.llm = llm
        self.sampling = sampling or SamplingParams()
        model_ctx = llm.context_length
        self.max_context = model_ctx if max_context is None else max_context
        if not 1 <= self.max_context <= model_ctx:
            raise InvalidRequestError(f"--max-context must be in [1, {model_ctx}] (the model's context), "
                                      f"got {self.max_context}")
        self.reserve = self.sampling.max_new_tokens
        if self.reserve >= self.max_context:
            raise InvalidRequestError(f"--max-tokens {self.reserve} leaves no room for a prompt within --max-context "
                                      f"{self.max_context}; lower the one or raise the other")
        stops = [*self.sampling.stop, *llm.template.stop_strings]
        self._params = SamplingParams.from_dict({**self.sampling.to_dict(), "stop": list(dict.fromkeys(stops))})
        self.system = system
        self.amnesia = amnesia
        self.history: list[dict] = []  # user/assistant messages, alternating, oldest first
        self.last: Reply | None = None
        self._open: Reply | None = None  # a reply still streaming: closed (and recorded) before the next one starts
        self.checked = False  # the prompt-format check runs on the first prompt only

    # ---- conversation ---------------------------------------------------------------------------------------

    def send(self, text: str) -> Reply:
        """Start the reply to a user message. Raises InvalidRequestError (history unchanged) if it cannot fit."""
        if not text.strip():
            raise InvalidRequestError("the message is empty; type some text")
        self._settle()
        return self._start(self.history, text)

    def retry(self) -> Reply:
        """Generate the last reply again; the new one replaces it when it ends (or is stopped)."""
        self._settle()
        if not self.history:
            raise InvalidRequestError("nothing to retry: the conversation is empty")
        return self._start(self.history[:-2], self.history[-2]["content"], replace=True)

    def undo(self) -> dict:
        """Remove the last exchange; returns its user message."""
        self._settle()
        if not self.history:
            raise InvalidRequestError("nothing to undo: the conversation is empty")
        user = self.history[-2]
        del self.history[-2:]
        return user

    def reset(self):
        """Forget the conversation (the system prompt stays)."""
        self._settle()
        self.history.clear()
        self.last = None

    def _settle(self):
        # a reply still streaming is stopped (and recorded) before the conversation changes
        if self._open is not None:
            self._open.close()

    @property
    def exchanges(self) -> int:
        return len(self.history) // 2

    @property
    def context_used(self) -> int:
        """Tokens of the last prompt plus its reply."""
        c = self.last.completion if self.last else None
        return c.prompt_tokens + c.generated_tokens if c else 0

    def prompt_for(self, user: str, history: list[dict] | None = None) -> Turn:
        """What the model would be given if `user` were sent now."""
        history = self.history if history is None else history
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        tail = [{"role": "user", "content": user}]
        forgotten = len(history) // 2 if self.amnesia else 0
        history = [] if self.amnesia else history
        n = len(history) // 2
        turns: dict[int, Turn] = {}

        def fits(k: int) -> bool:  # the prompt without the k oldest exchanges leaves room for the reply
            turns[k] = self._turn(head + history[2 * k :] + tail, forgotten + k)
            return len(turns[k].ids) + self.reserve <= self.max_context

        if not fits(n):
            alone = len(turns[n].ids)
            raise InvalidRequestError(
                f"the message needs {alone} prompt tokens even without any history, plus {self.reserve} reserved for "
                f"the reply (--max-tokens): more than --max-context {self.max_context}; shorten it, lower --max-tokens "
                "or raise --max-context")
        lo, hi = 0, n  # fewest exchanges to leave out: token count falls as k grows
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
        return turns[lo]

    def _turn(self, messages: list[dict], left_out: int) -> Turn:
        prompt = self.llm.apply_chat_template(messages)
        return Turn(messages, prompt, self.llm.encode(messages), left_out)

    def _start(self, history: list[dict], user: str, replace: bool = False) -> Reply:
        t0 = time.perf_counter()
        turn = self.prompt_for(user, history)
        if not self.checked:
            self.checked = True
            tpl = self.llm.template
            turn.findings = check_prompt(turn.prompt, vocab=self.llm.tokenizer, template=tpl, messages=turn.messages,
                                         encode_special=tpl.encode_special)
        self._open = Reply(self, turn, user, self.llm.stream(turn.messages, self._params), t0, replace)
        return self._open

    def _record(self, reply: Reply):
        self._open = None
        if reply.replace:
            del self.history[-2:]
        self.history += [{"role": "user", "content": reply.user}, {"role": "assistant", "content": reply.text}]
        self.last = reply

    # ---- save / load ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "messages": [dict(m) for m in self.history]}

    def save(self, path: str | Path):
        """Write the conversation as JSON: {"system": ..., "messages": [{"role", "content"}, ...]}."""
        try:
            Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
            raise InvalidRequestError(f"cannot save to {str(path)!r}: {_reason(e)}") from None

    def load(self, path: str | Path):
        """Replace the conversation with a saved one: this format, or a plain message list (an optional system
        message first, then user/assistant alternating). The system prompt is kept when the file has none."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidRequestError(f"{str(path)!r} is not JSON: {e}") from None
        except (OSError, ValueError) as e:
            raise InvalidRequestError(f"cannot read {str(path)!r}: {_reason(e)}") from None
        system, history = _parse_conversation(data, str(path))
        self._settle()
        self.history = history
        if system is not None:
            self.system = system
        self.last = None


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def _is_text(value: Any) -> bool:
    """A str that can be encoded: JSON's \\ud800 escapes give lone surrogates the tokenizer cannot take."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_conversation(data: Any, where: str) -> tuple[str | None, list[dict]]:
    if isinstance(data, dict):
        system, messages = data.get("system"), data.get("messages")
    else:
        system, messages = None, data
    if not isinstance(messages, list):
        raise InvalidRequestError(f"{where}: expected {{'system': ..., 'messages': [...]}} or a list of messages")
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        system, messages = messages[0].get("content"), messages[1:]
    if system is not None and not _is_text(system):
        raise InvalidRequestError(f"{where}: the system prompt must be a string of text, got {system!r}")
    history = []
    for i, m in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != want or not _is_text(m.get("content")):
            raise InvalidRequestError(f"{where}: message {i} must be {{'role': '{want}', 'content': TEXT}} "
                                      f"(user and assistant alternating), got {m!r}")
        history.append({"role": want, "content": m["content"]})
    if len(history) % 2:
        raise InvalidRequestError(f"{where}: the last user message has no assistant reply; remove it or add one")
    return system, history
