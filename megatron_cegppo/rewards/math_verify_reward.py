"""Rule-based math reward: the last ``\\boxed{...}`` answer of a response, checked against
the reference answer with math-verify under a wall-clock bound.

Why a child process: math-verify's own timeouts use ``signal.alarm``, which only works in
the main thread, and some inputs (``\\boxed{9^{9^{9^{9}}}}``) send sympy into a single C-level
big-integer operation that holds the GIL. A worker *thread* then cannot be abandoned (the
waiting thread never gets the GIL back) and no signal handler runs. So parsing and
verification run in one long-lived child Python process, in its main thread (where the
library's alarm-based timeouts are passed and work, letting the child recover on its own
from most slow inputs); the caller waits on a pipe with a deadline and kills and replaces
the child when the deadline passes. That bound holds from any thread. The boxed content is
also capped at ``MAX_ANSWER_CHARS`` before it is sent, so huge outputs never reach sympy.
"""

from __future__ import annotations

import atexit
import importlib
import json
import logging
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from typing import Any, Optional, Sequence

logger = logging.getLogger(__name__)

# Real final answers are short; longer boxed content is scored 0 without calling sympy.
MAX_ANSWER_CHARS = 1000
# Starting the child (interpreter + sympy import) is not part of a call's budget.
STARTUP_TIMEOUT_S = 120.0

# ``\boxed{`` opens an answer, ``\x`` escapes (``\{``, ``\}``, ``\\``) are skipped so literal
# set braces do not unbalance the match, bare braces nest.
_TOKENS = re.compile(r"\\boxed\s*\{|\\.|[{}]", re.DOTALL)


def extract_boxed(text: str, which: str = "last") -> Optional[str]:
    """Content of the first or last (by start position) complete ``\\boxed{...}`` in
    ``text``, nested braces included; ``None`` when there is none. One linear scan, so a
    long or unbalanced string costs no more than reading it."""
    if which not in ("first", "last"):
        raise ValueError(f"which must be 'first' or 'last', got {which!r}")
    if not isinstance(text, str):
        return None
    stack: list = []  # (content start, opened by \boxed)
    best: Optional[tuple] = None
    for m in _TOKENS.finditer(text):
        tok = m.group()
        if tok == "}":
            if stack:
                start, boxed = stack.pop()
                later = best is not None and start > best[0]
                if boxed and (best is None or later == (which == "last")):
                    best = (start, m.start())
        elif tok == "{" or tok.startswith("\\boxed"):
            stack.append((m.end(), tok != "{"))
    return None if best is None else text[best[0]:best[1]]


def _check(pred: str, answer: str, lib_timeout: int) -> bool:
    """Runs in the child: True when ``pred`` and ``answer`` are mathematically equal."""
    from math_verify import parse, verify

    gold = parse("\\boxed{" + answer + "}", parsing_timeout=lib_timeout)
    guess = parse("\\boxed{" + pred + "}", parsing_timeout=lib_timeout)
    return bool(gold and guess and verify(gold, guess, timeout_seconds=lib_timeout))


def _check_whole(response: str, answer: str, lib_timeout: int) -> bool:
    """Runs in the child: True when math-verify's extraction from the whole ``response`` (its
    default targets: boxed and plain LaTeX, then expressions) is ``answer``, as a string or
    mathematically. The CE-GPPO authors' scoring (``math_verify_from_sky`` in their
    verl fork's ``reward_score/math_dapo.py``)."""
    from math_verify import parse, verify

    guess = parse(response, parsing_timeout=lib_timeout)
    if len(guess) < 2:
        return False
    if guess[1] == answer:
        return True
    gold = parse("\\boxed{" + answer + "}", parsing_timeout=lib_timeout)
    return bool(gold and verify(gold, guess, timeout_seconds=lib_timeout))


# What the child runs for each reward, as "module:function" (a string so it crosses the pipe).
_CHECK_TARGET = f"{__name__}:_check"
_CHECK_WHOLE_TARGET = f"{__name__}:_check_whole"


class WorkerLost(RuntimeError):
    """The child process exited or closed its pipe in the middle of a call."""


class RemoteError(RuntimeError):
    """The target raised inside the child (the child itself is fine)."""


class _Worker:
    """One child process speaking JSON lines: request ``{"target", "args"}``, reply
    ``{"ok", "result" | "error"}``."""

    def __init__(self) -> None:
        env = dict(os.environ)
        # The child must import whatever the parent can (this package, test helpers).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        code = f"import {__name__} as m; m._serve()"
        self.owner_pid = os.getpid()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, close_fds=True,
        )
        self._buf = b""
        # selectors (epoll) rather than select(): training processes can hold fds > 1024.
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not self._read(time.monotonic() + STARTUP_TIMEOUT_S).get("ready"):
                raise WorkerLost("unexpected first message")
        except (TimeoutError, WorkerLost) as e:
            self.kill()
            raise RuntimeError(f"math-verify worker process failed to start: {e}") from e

    def call(self, target: str, args: Sequence[Any], timeout_s: float) -> Any:
        """``target(*args)`` in the child; TimeoutError after ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        try:
            self.proc.stdin.write((json.dumps({"target": target, "args": list(args)}) + "\n").encode())
            self.proc.stdin.flush()
        except OSError as e:
            raise WorkerLost(f"write failed: {e}") from e
        reply = self._read(deadline)
        if not reply.get("ok"):
            raise RemoteError(f"{target} failed in the worker: {reply.get('error')}")
        return reply.get("result")

    def _read(self, deadline: float) -> dict:
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._sel.select(remaining):
                raise TimeoutError("math-verify worker did not answer in time")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise WorkerLost(f"worker exited (code {self.proc.poll()})")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._sel.close()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def _serve() -> None:
    """Child main loop: answers requests until stdin closes (the parent went away)."""
    from megatron_cegppo.lifeline import exit_with_parent

    exit_with_parent()  # even mid-request, or while a forked copy of the parent holds stdin open
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the reply channel
    sys.stdout = sys.stderr
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # per-timeout chatter
    import math_verify  # noqa: F401  (pay the sympy import before reporting ready)

    def send(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    send({"ready": True})
    for line in sys.stdin:
        try:
            req = json.loads(line)
            module, fn = req["target"].split(":")
            send({"ok": True, "result": getattr(importlib.import_module(module), fn)(*req["args"])})
        except Exception as e:  # reported to the caller, the loop goes on
            send({"ok": False, "error": repr(e)[:500]})


_lock = threading.Lock()
_worker: Optional[_Worker] = None


def _reset_after_fork() -> None:
    # A forked child must not share the parent's pipes; it starts its own worker on demand.
    global _lock, _worker
    _lock, _worker = threading.Lock(), None


os.register_at_fork(after_in_child=_reset_after_fork)


def call_bounded(target: str, args: Sequence[Any], timeout_s: float) -> Any:
    """Runs ``module:function`` ``target`` on ``args`` in the worker process; raises
    TimeoutError (worker killed and replaced on the next call) after ``timeout_s``
    seconds, WorkerLost if the worker died. Calls from several threads take turns."""
    global _worker
    with _lock:
        if _worker is None or _worker.proc.poll() is not None or _worker.owner_pid != os.getpid():
            _worker = _Worker()
        try:
            return _worker.call(target, args, timeout_s)
        except (TimeoutError, WorkerLost):
            _worker.kill()
            _worker = None
            raise


def shutdown_math_worker() -> None:
    """Stops the worker process (a later call starts a new one)."""
    global _worker
    with _lock:
        if _worker is not None and _worker.owner_pid == os.getpid():
            _worker.kill()
        _worker = None


atexit.register(shutdown_math_worker)


def math_reward(response: str, answer: str, *, timeout_s: float = 5.0) -> float:
    """1.0 when the last ``\\boxed{...}`` of ``response`` equals ``answer`` per
    math-verify, else 0.0 (also for no boxed answer, garbage, or a check that overruns
    ``timeout_s``). The first call also waits for the worker process to start."""
    pred = extract_boxed(response, "last")
    if pred is None or not pred.strip() or len(pred) > MAX_ANSWER_CHARS:
        return 0.0
    # The child's own alarms fire first (three timed steps), so it usually recovers
    # without being killed; the parent's deadline is the hard bound.
    lib_timeout = max(1, int(timeout_s / 3))
    try:
        ok = call_bounded(_CHECK_TARGET, (pred, str(answer), lib_timeout), timeout_s)
    except TimeoutError:
        logger.warning("math_reward: check exceeded %.1fs, scored 0.0 (answer %.80r)", timeout_s, pred)
        return 0.0
    except (WorkerLost, RemoteError) as e:
        logger.warning("math_reward: %s, scored 0.0 (answer %.80r)", e, pred)
        return 0.0
    return 1.0 if ok is True else 0.0


# Whole responses are long (16k tokens are ~60k characters); longer text is scored incorrect
# without calling sympy.
MAX_RESPONSE_CHARS = 400_000


def math_signed_reward(response: str, answer: str, *, timeout_s: float = 5.0) -> float:
    """+1.0 when math-verify finds ``answer`` in the whole ``response``, else -1.0 (also for no
    answer, garbage, or a check that overruns ``timeout_s``): the CE-GPPO authors' reward."""
    if not isinstance(response, str) or not response.strip() or len(response) > MAX_RESPONSE_CHARS:
        return -1.0
    lib_timeout = max(1, int(timeout_s / 3))
    try:
        ok = call_bounded(_CHECK_WHOLE_TARGET, (response, str(answer), lib_timeout), timeout_s)
    except TimeoutError:
        logger.warning("math_signed_reward: check exceeded %.1fs, scored -1.0", timeout_s)
        return -1.0
    except (WorkerLost, RemoteError) as e:
        logger.warning("math_signed_reward: %s, scored -1.0", e)
        return -1.0
    return 1.0 if ok is True else -1.0
