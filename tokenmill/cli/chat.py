"""`tokenmill chat`: the terminal side of a ChatSession.

Replies stream to stdout as raw text (code blocks coloured on a terminal); prompts, notes, stats and warnings go to
stderr, so `tokenmill chat < script > replies.txt` keeps only the replies.
"""
from __future__ import annotations

import sys

from tokenmill.cli.flags import add_load_flags, add_sampler_flags, load_llm, positive_int, sampling_from_args
from tokenmill.errors import InvalidRequestError, TokenmillError
from tokenmill.monitoring.metrics_log import add_metrics_flag, open_log

HELP = """commands:
  /help            this list
  /reset           forget the conversation (the system prompt stays)
  /undo            remove the last exchange
  /retry           generate the last reply again
  /system [TEXT]   show the system prompt, or set it
  /save FILE       write the conversation as JSON
  /load FILE       continue a saved conversation (its system prompt, if it has one)
  /stats           context use and the last reply's speed
  /quit            leave (also Ctrl-D)
Ctrl-C stops a reply; the partial reply is kept (/retry regenerates it, /undo removes it).
Start a message with // to send text that begins with /."""


def add_parser(sub):
    """Register `chat` on the CLI's subparsers."""
    c = sub.add_parser("chat", help="chat with a model in the terminal, streaming replies", description=(
        "Chat with a model. Each turn reuses the KV cache of the previous one, so only new tokens are computed; "
        "when the conversation outgrows --max-context, the oldest exchanges are left out. Type /help for commands."))
    c.add_argument("--system", help="system prompt (default: the template's own, if it has one)")
    c.add_argument("--template", help="chat template: a built-in name or a .jinja file (default: the model's own)")
    c.add_argument("--amnesia", action="store_true", help="every turn starts from the system prompt alone")
    c.add_argument("--max-context", type=positive_int,
                   help="tokens of prompt + reply at most (default: the model's context)")
    add_metrics_flag(c)
    add_load_flags(c)
    add_sampler_flags(c)
    c.set_defaults(func=cmd_chat)


# ---------------------------------------------------------------------------------------------------------

class FenceStyler:
    """Streams text through `write(text, style)`, giving lines inside ``` code fences their own style. A line start
    is held back only while it could still turn out to be a fence."""

    def __init__(self, write):
        self.write, self.in_code, self.fence, self.pending = write, False, None, ""

    def feed(self, text: str):
        for part in text.splitlines(keepends=True):
            if self.fence is None:  # at a line start: is this line a fence?
                s = self.pending + part
                head = s.lstrip(" ")
                if head.startswith("```"):
                    self.fence = True
                elif "```".startswith(head) and not s.endswith("\n"):
                    self.pending = s
                    continue
                else:
                    self.fence = False
                part, self.pending = s, ""
            self.write(part, "dim" if self.fence else "green" if self.in_code else None)
            if part.endswith("\n"):
                self.in_code ^= bool(self.fence)
                self.fence = None

    def flush(self):
        if self.pending:
            self.write(self.pending, "green" if self.in_code else None)
        self.pending, self.fence, self.in_code = "", None, False


class ChatREPL:
    """Reads lines, runs commands, streams replies. `tty` styles output and shows a prompt."""

    def __init__(self, session, *, tty: bool, metrics=None, preset: str | None = None):
        from rich.console import Console

        self.s, self.tty = session, tty
        self.metrics, self.preset = metrics, preset  # a MetricsLog: one line per reply
        self.err = Console(stderr=True, soft_wrap=True, highlight=False, emoji=False)
        self.out = Console(soft_wrap=True, highlight=False, emoji=False) if tty else None

    def note(self, text: str, style: str = "dim"):
        self.err.print(text, style=style, markup=False)

    def loop(self) -> int:
        if self.tty:
            import readline  # noqa: F401  (line editing and history for input())

            self.note(f"chatting with {self.s.llm.loaded.path.name}; /help for commands, Ctrl-D to leave")
        if hasattr(sys.stdin, "reconfigure"):  # a strict decoder would drop a bad byte's whole block, not its line
            sys.stdin.reconfigure(errors="surrogateescape")
        while True:
            try:
                line = input("\n> ") if self.tty else sys.stdin.readline()
                line.encode("utf-8")  # bad bytes arrive as lone surrogates (see above)
            except KeyboardInterrupt:
                self.note("\n(/quit or Ctrl-D to leave)")
                continue
            except EOFError:  # Ctrl-D
                print()
                return 0
            except UnicodeError:
                self.note("error: that line is not valid UTF-8; it was not sent (type it again)", "red")
                continue
            if not self.tty and not line:  # end of input
                return 0
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                if line.startswith("/") and not line.startswith("//"):
                    if self.command(line) == "quit":
                        return 0
                else:
                    self.reply(self.s.send(line[1:] if line.startswith("//") else line))
            except TokenmillError as e:
                self.note(f"error: {e}", "red")
            except KeyboardInterrupt:
                self.note("\n(interrupted)")

    def reply(self, reply):
        turn = reply.turn
        for f in turn.findings:
            self.note(f"warning: prompt format: {f}", "yellow")
        last = self.s.last.turn.left_out if self.s.last else 0
        if not self.s.amnesia and turn.left_out > last:
            self.note(f"(context: left out the {turn.left_out - last} oldest exchange"
                      f"{'s' * (turn.left_out - last != 1)} to fit --max-context {self.s.max_context}; "
                      f"{turn.left_out} left out in all, the system prompt is kept)")
        styler = FenceStyler(self._write) if self.tty else None
        emit = styler.feed if styler else lambda text: self._write(text, None)
        shown = 0
        try:
            for piece in reply:
                shown += len(piece)  # counted first: a Ctrl-C inside the write must not print the piece twice
                emit(piece)
        except KeyboardInterrupt:
            reply.close()
            # text released by the step that was interrupted, before it reached the screen: the kept reply shows whole
            emit(reply.text[shown:])
        finally:
            if styler:
                styler.flush()
        self._write("\n", None)
        if reply.interrupted:
            self.note("(stopped; the partial reply is kept: /retry regenerates it, /undo removes the exchange)")
        self.note(self.stats_line(reply))
        if self.metrics and reply.completion:
            self.metrics.record(reply.completion, self.s.llm, request_id=f"turn-{self.s.exchanges}",
                                params=self.s.sampling, preset=self.preset, total_s=reply.seconds)

    def _write(self, text: str, style: str | None):
        if self.out is not None:
            self.out.print(text, style=style, end="", markup=False)
        else:
            sys.stdout.write(text)
        sys.stdout.flush()

    def stats_line(self, reply) -> str:
        c = reply.completion
        if c is None:
            return f"context {self.s.context_used}/{self.s.max_context}"
        return (f"prompt {c.prompt_tokens} tok ({c.cached_tokens} cached, {c.prompt_tokens - c.cached_tokens} new) "
                f"{c.prompt_tps:.0f} tok/s | reply {c.generated_tokens} tok {c.generation_tps:.1f} tok/s | "
                f"{reply.seconds:.2f} s | context {self.s.context_used}/{self.s.max_context}")

    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        s = self.s
        if name in ("/quit", "/exit", "/q"):
            return "quit"
        if name == "/help":
            self.note(HELP, "")
        elif name == "/reset":
            s.reset()
            self.note("(conversation cleared; the system prompt stays)")
        elif name == "/undo":
            user = s.undo()
            self.note(f"(removed the last exchange: {_clip(user['content'])!r})")
        elif name == "/retry":
            self.reply(s.retry())
        elif name == "/system":
            if arg:
                s.system = arg
                self.note("(system prompt set; it applies from the next turn)")
            else:
                self.note(f"system prompt: {s.system!r}" if s.system is not None else
                          "system prompt: none given (the template's default applies, if it has one)", "")
        elif name in ("/save", "/load"):
            if not arg:
                raise InvalidRequestError(f"{name} needs a file name, e.g. {name} chat.json")
            if name == "/save":
                s.save(arg)
                self.note(f"(saved {s.exchanges} exchanges to {arg})")
            else:
                s.load(arg)
                self.note(f"(loaded {s.exchanges} exchanges from {arg})")
        elif name == "/stats":
            shown = s.last.turn.left_out if s.last else 0
            lines = [f"exchanges: {s.exchanges} ({shown} left out of the last prompt)"
                     + (", amnesia on" if s.amnesia else ""),
                     f"context: {s.context_used}/{s.max_context} tokens used, {s.reserve} reserved for a reply"]
            if s.last is not None:
                lines.append("last reply: " + self.stats_line(s.last))
            self.note("\n".join(lines), "")
        else:
            raise InvalidRequestError(f"unknown command {name!r}; /help lists them (start with // to send text "
                                      "beginning with /)")
        return None


def _clip(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def cmd_chat(args) -> int:
    from tokenmill.chat import ChatSession

    params = sampling_from_args(args)  # bad flags fail before the model loads
    log = open_log(args, "chat")
    llm = load_llm(args)
    session = ChatSession(llm, params, system=args.system, max_context=args.max_context, amnesia=args.amnesia)
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    return ChatREPL(session, tty=tty, metrics=log, preset=args.preset).loop()
