"""The watcher: look at the run, publish what is due, keep what ``--keep`` says, run ``--then``.

    recover  (coordinator) finish the last publish's bookkeeping if a kill interrupted it
    loop:
      stop?    (every rank) any rank asked to stop (SIGTERM/SIGINT, or the API's stop event)
      look     (coordinator) the format's complete checkpoints (its own commit marker decides),
                             and the due merges: the newest, or every one not yet published
      for each due merge: publish (watcher.update: the engine's steps), record, keep, --then
      sleep --poll seconds (woken early by a stop request); --once: stop after one look

A signal never cuts an update short: it is finished, then the watcher stops (a second Ctrl-C
aborts at once; the interrupted update is redone by the next start). Failures of one update
(an input problem, a checkpoint deleted by retention) are reported and the last published
merge stays; the watcher goes on. With ``--once`` the exit status says whether all went well.
"""
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..dist.collective import Collective
from ..engine import faults
from ..engine.manifest import MANIFEST, Manifest
from ..engine.report import human_bytes
from ..errors import InputError, MergeError, UsageError
from ..formats import available_formats, format_class
from ..io.atomic import copy_atomically
from ..merge.methods import get_method
from ..plan.types import OutputKind
from .context import RunningStateMismatch
from .ledger import WATCH_DIR, History, Ledger, Published
from .options import WatchOptions
from .update import UpdatePlanner, WatchUpdate
from .window import due


@dataclass
class PublishedMerge:
    """What one publish did (the Python API's view of a history entry)."""
    iteration: int
    path: str                 # the merged checkpoint directory
    window: List[int]         # the iterations merged, oldest first
    reads: List[int]          # the checkpoints read
    incremental: bool         # a running state was read (else the whole window)
    bytes_read: int           # checkpoints and state
    seconds: float


@dataclass
class WatchResult:
    published: List[PublishedMerge] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)
    stopped: bool = False     # by a signal or the stop event

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class _Look:
    format_name: Optional[str] = None
    due: List[int] = field(default_factory=list)
    available: Dict[int, str] = field(default_factory=dict)
    problem: Optional[str] = None
    waiting: Optional[str] = None


class Watcher:
    def __init__(self, options: WatchOptions, collective: Collective, stop: Optional[threading.Event] = None):
        self.options, self.collective = options, collective
        self.stop_event = stop or threading.Event()
        self.ledger = Ledger(options.out)
        self.result = WatchResult()
        self._said: Optional[str] = None
        self.coordinator = collective.is_coordinator
        self.quiet = options.merge.quiet

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> WatchResult:
        collective = self.collective
        collective.coordinator_step("recover", self._recover)
        while True:
            if self._stop_requested():
                break
            look: _Look = collective.coordinator_step("look", self._look)
            if look.problem:
                self._failed(look.problem)
            elif look.waiting and self.coordinator and not self.quiet and look.waiting != self._said:
                print(f"pmm-dist watch: waiting: {look.waiting}", flush=True)
            self._said = look.waiting
            for target in look.due:
                if self._stop_requested():
                    break
                self._publish(look, target)
            if self.options.once and not look.due and not look.waiting and not look.problem and \
                    self.coordinator and not self.quiet:
                print("pmm-dist watch: nothing new to publish", flush=True)
            if self.options.once or self.result.stopped:
                break
            self.stop_event.wait(self.options.poll)
        return self.result

    def _stop_requested(self) -> bool:
        if self.result.stopped:
            return True
        stopped = any(self.collective.step("stop?", self.stop_event.is_set))
        self.result.stopped = stopped
        return stopped

    # -- looking (coordinator) -----------------------------------------------------------------
    def _look(self) -> _Look:
        options = self.options
        run_dir = options.run_dir
        if not os.path.isdir(run_dir):
            return self._waiting(f"{run_dir} does not exist (yet)")
        identity = self.ledger.identity()
        name = options.merge.format if options.merge.format != "auto" else (identity or {}).get("format")
        if name is None:
            name = self._detect(run_dir)
            if name is None:
                return self._waiting(f"no complete checkpoint in {run_dir} yet")
        fmt = format_class(name)()
        if not fmt.recognizes(run_dir):
            return self._waiting(f"no complete {name} checkpoint in {run_dir} yet")
        self.ledger.claim(self._identity(name))
        try:
            refs = fmt.discover([run_dir])
        except InputError as exc:
            return _Look(format_name=name, problem=str(exc))
        except OSError as exc:  # a directory vanishing under the listing (retention): look again later
            return _Look(format_name=name, problem=f"{run_dir}: {exc}")
        available = {ref.iteration: ref.path for ref in refs}
        history = self.ledger.load()
        new = {it: path for it, path in available.items() if history.checkpoints.get(it) != path}
        if new:
            history.checkpoints.update(new)
            self.ledger.save(history)
        last = history.last.iteration if history.last else None
        targets = due(available, last, self.options.backfill)
        ready = [t for t in targets if self._window_is_possible(history, available, t)]
        if not ready and targets and not self.options.backfill:
            return self._waiting(f"{len(targets)} checkpoint(s) to merge, but --weights needs "
                                 f"{self.options.window_length} in a window", name, available)
        return _Look(format_name=name, due=ready, available=available)

    def _detect(self, run_dir: str) -> Optional[str]:
        """The format, as ``--format auto`` finds it, once no format has a checkpoint of the run
        still being written (which could make it look like another format's)."""
        classes = [format_class(name) for name in available_formats()]
        if any(cls.being_written(run_dir) for cls in classes):
            return None
        for cls in classes:
            if cls.recognizes(run_dir):
                return cls.name
        return None

    def _window_is_possible(self, history: History, available: Dict[int, str], target: int) -> bool:
        """A method with a fixed number of checkpoints (explicit weights) waits for them."""
        method = get_method(self.options.merge.method)
        fixed = method.fixed_count(self.options.merge.method_options())
        if fixed is None:
            return True
        known = sorted(set(history.checkpoints) | set(available))
        return len([it for it in known if it <= target]) >= fixed

    def _waiting(self, why: str, name: Optional[str] = None, available=None) -> _Look:
        return _Look(format_name=name, available=available or {}, waiting=why)

    def _identity(self, format_name: str) -> dict:
        """What decides the merges' contents (--on-nonfinite, --keep, --poll, ... do not: they
        may change from one start to the next)."""
        merge = self.options.merge
        method = get_method(merge.method)
        return {"format_version": 1, "run_dir": os.path.abspath(self.options.run_dir), "format": format_name,
                "method": method.name, "method_options": {k: v for k, v in method.options(merge.method_options()).items()
                                                          if v is not None},
                "last": self.options.window_length, "interval": merge.interval, "optimizer": str(merge.optimizer)}

    # -- publishing (every rank) ---------------------------------------------------------------
    def _publish(self, look: _Look, target: int) -> None:
        started = time.perf_counter()
        merged = None
        for from_scratch in (False, True):
            planner = None
            if self.coordinator:
                planner = UpdatePlanner(self.options, look.format_name, self.ledger, self.ledger.load(),
                                        look.available, from_scratch=from_scratch)
            update = WatchUpdate(self.options.merge_options_for(self.options.out, format=look.format_name),
                                 self.collective, planner, target)
            try:
                merged = update.run()
                break
            except MergeError as exc:
                if getattr(exc, "interrupted", False):
                    raise
                if isinstance(exc, UsageError) or getattr(exc, "usage", False):
                    raise
                if not from_scratch and _state_cannot_continue(exc):
                    if self.coordinator and not self.quiet:
                        print(f"pmm-dist watch: the running state cannot continue to iteration {target}, so the "
                              f"whole window is merged:\n  {exc}", flush=True)
                    continue
                self._failed(f"the merge at iteration {target} failed: {exc}")
                return
        published = self.collective.coordinator_step("publish", lambda: self._record(merged.plan, started))
        self.result.published.append(published)
        if self.coordinator and not self.quiet:
            self._say_published(published, merged.plan)
        self.collective.coordinator_step("then", lambda: self._then(published.iteration))

    def _record(self, plan, started: float) -> PublishedMerge:
        ledger = self.ledger
        history = ledger.load()
        manifest = Manifest.read(plan.out)
        if plan.output.kind == OutputKind.RUN_DIRECTORY:  # the root holds the newest one only
            copy_atomically(os.path.join(plan.out, MANIFEST), ledger.manifest_copy(plan.dirname))
        state_info = ledger.state_info(plan.target) if plan.state_dir else None
        window = [c.iteration for c in plan.window]
        entry = Published(iteration=plan.target, dirname=plan.dirname,
                          window={"first": window[0], "last": window[-1], "count": len(window)},
                          reads=[c.iteration for c in plan.checkpoints], incremental=plan.incremental,
                          bytes_read=manifest.bytes_read, state=bool(state_info and state_info.get("usable")),
                          layout=str(plan.output.kind))
        history.published.append(entry)
        ledger.save(history)
        faults.inject("watch:recorded", 0)
        self._finish(history)
        return PublishedMerge(plan.target, os.path.join(ledger.out, plan.dirname), window, entry.reads,
                              entry.incremental, entry.bytes_read, time.perf_counter() - started)

    def _finish(self, history: History) -> None:
        """After a publish (or, after a kill, at the next start): the index, then what --keep and
        the window no longer need. Idempotent."""
        ledger, options = self.ledger, self.options
        last = history.last
        kept = history.published[-options.keep:] if options.keep else list(history.published)
        if last.layout == str(OutputKind.CHECKPOINT_ROOT):
            ledger.write_index(kept, get_method(options.merge.method).name)
        faults.inject("watch:index", 0)
        kept_names = {p.dirname for p in kept}
        for entry in history.published:
            if entry.dirname not in kept_names:
                ledger.discard(os.path.join(ledger.out, entry.dirname))
                ledger.discard(os.path.dirname(ledger.manifest_copy(entry.dirname)))
        # An update interrupted after this publish keeps its output and state: the next start
        # resumes it (or, going for another target, clears them: WatchUpdate._prepare).
        pending = ledger.pending()
        in_flight = pending["iteration"] if pending and pending["iteration"] > last.iteration else None
        needed = self._needed_states(history) | {in_flight}
        for iteration in ledger.state_iterations():
            if iteration not in needed:
                ledger.discard(ledger.state_dir(iteration))
        if in_flight is None:
            ledger.clear_pending()
        ledger.empty_trash()

    def _needed_states(self, history: History) -> set:
        """The newest state, and with --interval V those of the other chains a later window may
        continue (newer than the newest's iteration - V)."""
        last = history.last
        interval = self.options.merge.interval
        with_state = [p.iteration for p in history.published if p.state]
        if interval is None:
            return {last.iteration} & set(with_state)
        return {it for it in with_state if it > last.iteration - interval}

    def _then(self, iteration: int) -> None:
        command = self.options.then
        history = self.ledger.load()
        entry = next(p for p in reversed(history.published) if p.iteration == iteration)
        if not command:
            return
        env = dict(os.environ, PMM_MERGED_PATH=os.path.join(self.ledger.out, entry.dirname),
                   PMM_ITERATION=str(entry.iteration), PMM_METHOD=get_method(self.options.merge.method).name,
                   PMM_OUT=self.ledger.out, PMM_WINDOW=f"{entry.window['first']}..{entry.window['last']}")
        sys.stdout.flush()
        try:
            code = subprocess.run(command, shell=True, env=env).returncode
        except OSError as exc:
            code = 127
            print(f"pmm-dist watch: --then could not start: {exc}", file=sys.stderr, flush=True)
        if code != 0:
            print(f"pmm-dist watch: error: --then {command!r} exited with status {code} after publishing "
                  f"{entry.dirname}; watching goes on", file=sys.stderr, flush=True)
        entry.then = code
        self.ledger.save(history)

    # -- recovery (coordinator) ----------------------------------------------------------------
    def _recover(self) -> None:
        ledger = self.ledger
        if not os.path.isdir(ledger.root):
            return
        ledger.empty_trash()
        ledger.remove_temporary_files()
        history = ledger.load()
        if history.last is None:
            return
        self._finish(history)
        if history.last.then is None and self.options.then:
            self._then(history.last.iteration)

    # -- reporting (coordinator) ---------------------------------------------------------------
    def _failed(self, message: str) -> None:
        """Reported once while it repeats (a watcher retrying the same update at every look)."""
        if self.result.failures and self.result.failures[-1] == message:
            return
        self.result.failures.append(message)
        if self.coordinator:
            print(f"pmm-dist watch: error: {message}", file=sys.stderr, flush=True)

    def _say_published(self, published: PublishedMerge, plan) -> None:
        window = published.window
        span = f"{window[0]}..{window[-1]}" if len(window) > 1 else str(window[0])
        how = (f"read {len(published.reads)} checkpoint(s) and the running state" if published.incremental
               else f"read {len(published.reads)} checkpoint(s)")
        print(f"pmm-dist watch: published {published.path}: {plan.method} of {len(window)} checkpoint(s) ({span}); "
              f"{how}, {human_bytes(published.bytes_read)}, {published.seconds:.2f} s", flush=True)


def _state_cannot_continue(exc: MergeError) -> bool:
    """Whether an update failed only because its running state cannot continue (on every
    failing rank), which a merge of the whole window does not need."""
    if isinstance(exc, RunningStateMismatch):
        return True
    errors = getattr(exc, "errors_by_rank", None)
    return bool(errors) and all(e.kind == RunningStateMismatch.__name__ for e in errors.values())


def run_watcher(options: WatchOptions, *, stop: Optional[threading.Event] = None, handle_signals: bool = False
                ) -> WatchResult:
    """The watcher on this rank, with its own collective (or the caller's process group)."""
    _check_paths(options)
    stop = stop or threading.Event()
    collective = Collective(backend=options.merge.backend, timeout_minutes=options.merge.timeout_minutes,
                            sigterm_raises=not handle_signals)
    restore = _install_handlers(stop) if handle_signals else None
    try:
        return Watcher(options, collective, stop).run()
    finally:
        if restore:
            restore()
        collective.close()


def _check_paths(options: WatchOptions) -> None:
    run_dir, out = os.path.realpath(options.run_dir), os.path.realpath(options.out)
    if run_dir == out or os.path.commonpath([run_dir, out]) == out:
        raise UsageError(f"--out {options.out} is (or contains) the run directory {options.run_dir}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {options.out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isdir(os.path.join(out, WATCH_DIR)):
        raise UsageError(f"--out {options.out} is not empty and holds no watch ({WATCH_DIR} missing); "
                         "give a new or empty directory")


def _install_handlers(stop: threading.Event):
    """SIGTERM and the first SIGINT ask the watcher to stop after the current update; a second
    SIGINT interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def request_stop(signum, frame):
        if signum == signal.SIGINT and stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    for sig in previous:
        signal.signal(sig, request_stop)

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return restore
