"""One publish: the merge of the window ending at one checkpoint, through the engine's steps.

Planning (coordinator) chooses how: from a kept running state, reading only the checkpoints
the method's rules need (merge.incremental), or from scratch, reading the whole window (the
first merge; a method without running sums; a state that cannot reach the window; a checkpoint
the update needs deleted by the trainer's retention while the window is still there). The
checkpoints read take the place of the window in the plan, so every format check, merge and
commit is the engine's own; the arithmetic is ``watcher.context``'s.

    plan     (coordinator) window, way (state or scratch), checkpoints read, units, fingerprint
    check    (every rank)  the format's checks of the checkpoints read
    stage    (coordinator) staging and state directory: continued if this very update was
                           interrupted (same fingerprint), else fresh
    merge    (every rank)  units into staging, each unit's new state into states/<target>/
    commit   (coordinator) every state key consumed, state.json, then the engine's commit
                           (tracker / commit marker last)
"""
import hashlib
import json
import os
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

from .. import __version__
from ..engine.execution import ShareMerger
from ..engine.manifest import Manifest
from ..engine.options import MergeOptions
from ..engine.planning import MergePlan, check_one_run
from ..engine.run import MergeRun
from ..errors import InputError
from ..formats import format_class
from ..io.atomic import write_json_atomically, write_text_atomically
from ..io.planning_reads import gc_paused, planning_reads
from ..io.staging import STAGING, Staging, fingerprint, snapshot_inputs
from ..merge.incremental import CHECKPOINT, STATE, LinearUpdate, compose
from ..merge.methods import get_method
from ..plan.assign import assign_units
from ..plan.types import (MODEL_WEIGHTS_BY_OLDER, MODEL_WEIGHTS_FROM, MODEL_WEIGHTS_NOTE, WEIGHTS_FROM_MODEL, Action,
                          CheckpointRef, OutputKind, WorkUnit)
from . import context as ctx
from .ledger import History, Ledger
from .state import StateReader, StateWriter, read_json, state_bytes, state_file
from .window import window_for

STATE_INFO = "state.json"
FINGERPRINT = "fingerprint"


@dataclass(frozen=True)
class WatchPlan(MergePlan):
    target: int = 0
    dirname: str = ""                                # the published merge, relative to OUT
    window: Tuple[CheckpointRef, ...] = ()           # what the merge covers (``checkpoints``: what it reads)
    rule: Optional[ctx.UpdateRule] = None            # None: a plain weighted sum of the window
    previous_state: Optional[str] = None             # the state read, if any
    state_dir: Optional[str] = None                  # the state written, if any
    state_info: Optional[dict] = None                # its state.json (coordinator)
    incremental: bool = False


def checkpoint_digest(path: str) -> str:
    """Names, sizes and modification times of a checkpoint's files: a rewritten checkpoint (a
    trainer restarted from an earlier one saves the same iteration again) changes it."""
    entries = []
    for directory, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(directory, name)
            try:
                stat = os.stat(full)
            except FileNotFoundError:
                continue
            entries.append((os.path.relpath(full, path), stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:32]


class UpdatePlanner:
    """The coordinator's choice of how to publish ``target`` (see the module docstring)."""

    def __init__(self, options, format_name: str, ledger: Ledger, history: History, available: Dict[int, str],
                 from_scratch: bool = False):
        # from_scratch: no running state is read (the loop's second try, after RunningStateMismatch)
        self.options, self.format_name, self.ledger = options, format_name, ledger
        self.from_scratch = from_scratch
        self.history, self.available = history, available
        self.known = dict(history.checkpoints)
        self.known.update(available)
        merge = options.merge
        self.method = get_method(merge.method)
        self.given = merge.method_options()
        self.bounded = options.window_length is not None
        self.form = self.method.incremental_form(self.given, self.bounded)

    def window(self, target: int) -> List[int]:
        return window_for(target, self.known, last=self.options.window_length, interval=self.options.merge.interval)

    def plan(self, target: int, world_size: int):
        """The plan of the update publishing ``target``, the snapshot of its inputs and the format
        instance that planned (with what it parsed). As ``plan_merge``: each directory listed and
        each metadata file parsed once, without the cyclic GC."""
        with planning_reads(), gc_paused():
            return self._plan(target, world_size)

    def _plan(self, target: int, world_size: int):
        merge = self.options.merge
        fmt = format_class(self.format_name)()
        window = self.window(target)
        weights = self.method.weights(len(window), **self.given)
        # Where the newest's model weights come from as the format plans it (DCP, torch_dist: its
        # fp32 masters, when it has them): a state kept for other tensors cannot continue.
        weights_from = fmt.model_weights_source([CheckpointRef(target, self.available[target])], merge.optimizer) \
            if target in self.available else None
        update, previous = self._choose(target, window, weights_from)
        reads = sorted(set(update.reads if update is not None else window) | {target})
        missing = [it for it in reads if it not in self.available]
        if missing:
            raise InputError(self._missing_message(target, window, missing))
        read_refs = [CheckpointRef(it, self.available[it]) for it in reads]
        check_one_run(fmt, read_refs, merge.allow_mixed_runs)
        snapshot = snapshot_inputs(read_refs)
        units = fmt.plan_units(read_refs, merge.optimizer, world_size)
        output = fmt.output_layout(read_refs[-1])
        if output.kind == OutputKind.RUN_DIRECTORY:
            out, dirname = self.ledger.out, output.checkpoint_dirname
        else:  # the merge's root is the checkpoint: one directory per published merge
            dirname = os.path.basename(os.path.normpath(self.available[target]))
            out = os.path.join(self.ledger.out, dirname)
        rule = self._rule(update, reads) if update is not None else None
        window_refs = tuple(CheckpointRef(it, self.known[it]) for it in window)
        state_dir = self.ledger.state_dir(target) if rule is not None else None
        state_info = None
        if rule is not None:
            digests = dict(previous["digests"]) if previous else {}
            digests = {str(it): digests.get(str(it)) or checkpoint_digest(self.known[it])
                       for it in window if str(it) in digests or it in self.available}
            state_info = {"format_version": 1, "iteration": target, "window": window, "form": self.form.describe(),
                          "format": fmt.name, "optimizer": str(merge.optimizer), "digests": digests,
                          "newest_weights_from": weights_from}
        description = {"version": __version__, "format": fmt.name, "target": target, "window": window,
                       "weights": weights, "reads": [(r.iteration, r.path) for r in read_refs],
                       "previous": previous and {"iteration": previous["iteration"], "window": previous["window"],
                                                 "digests": previous["digests"]},
                       "rule": rule and repr(rule), "optimizer": merge.optimizer, "on_nonfinite": merge.on_nonfinite,
                       "include": list(merge.include or ()), "exclude": list(merge.exclude or ()),
                       "output_dirname": output.checkpoint_dirname,
                       "units": [(u.relpath, u.action, u.num_bytes) for u in units]}
        plan = WatchPlan(
            format_name=fmt.name, method=self.method.name,
            method_options={k: v for k, v in self.method.options(self.given).items() if v is not None},
            checkpoints=read_refs, weights=weights, layout=fmt.layout(read_refs),
            source_layouts=[fmt.checkpoint_layout(c) for c in read_refs], output=output, out=out,
            optimizer_policy=merge.optimizer, on_nonfinite=merge.on_nonfinite, tensor_filter=merge.tensor_filter(),
            bytes_read_by_source=tuple(fmt.bytes_read_by_source(units, read_refs)),
            fingerprint=fingerprint(description, snapshot), num_units=len(units), units=tuple(units),
            shares=tuple(tuple(s) for s in assign_units(units, world_size, len(read_refs))),
            target=target, dirname=dirname, window=window_refs, rule=rule,
            previous_state=self.ledger.state_dir(previous["iteration"]) if previous and rule.uses_state else None,
            state_dir=state_dir, state_info=state_info, incremental=bool(rule and rule.uses_state))
        return replace(plan, already_complete=_committed_already(plan)), snapshot, fmt

    # -- the way: a kept state, or from scratch ---------------------------------------------------
    def _choose(self, target: int, window: List[int], weights_from: Optional[str]
                ) -> Tuple[Optional[LinearUpdate], Optional[dict]]:
        """The update that reads the fewest checkpoints among those whose checkpoints all still
        exist: from a kept state, or from scratch (preferred on a tie: it reads no state)."""
        if self.form is None:
            return None, None
        scratch = compose(self.form, window)
        if self.from_scratch:
            return scratch, None
        candidates = []
        if all(it in self.available for it in scratch.reads):
            candidates.append((len(scratch.reads), 0, scratch, None))
        for rank, iteration in enumerate(reversed(self.ledger.state_iterations())):  # the newest state first
            info = self._usable_state(iteration, weights_from)
            if info is None:
                continue
            update = compose(self.form, window, info["window"])
            if update is None or any(it not in self.available for it in update.reads):
                continue  # cannot reach this window, or needs a checkpoint retention deleted
            if self._unchanged(info, update.reads):
                candidates.append((len(update.reads), 1 + rank, update, info))
        if not candidates:
            return scratch, None  # plan() names the checkpoints that are missing
        _, _, update, info = min(candidates, key=lambda c: (c[0], c[1]))
        return update, info

    def _usable_state(self, iteration: int, weights_from: Optional[str]) -> Optional[dict]:
        published = {p.iteration for p in self.history.published if p.state}
        if iteration not in published:
            return None  # an abandoned update's, or one not kept
        info = self.ledger.state_info(iteration)
        if not info or not info.get("usable", False):
            return None
        if info.get("form") != self.form.describe() or info.get("format") != self.format_name or \
                info.get("optimizer") != str(self.options.merge.optimizer) or \
                info.get("newest_weights_from", WEIGHTS_FROM_MODEL) != weights_from:
            return None
        return info

    def _unchanged(self, info: dict, reads: Sequence[int]) -> bool:
        """The state's checkpoints that this update reads again (to take them out), and with a
        bounded window all of them still present, are the very ones it was built from."""
        checked = set(reads) if not self.bounded else set(reads) | {int(it) for it in info["digests"]}
        for it in sorted(checked):
            recorded = info["digests"].get(str(it))
            if recorded is not None and it in self.available and checkpoint_digest(self.available[it]) != recorded:
                return False
        return True

    def _rule(self, update: LinearUpdate, reads: List[int]) -> ctx.UpdateRule:
        index = {it: k for k, it in enumerate(reads)}

        def operand(term):
            kind, which = term
            if kind == CHECKPOINT:
                return (ctx.SOURCE, index[which])
            return (ctx.STATE if kind == STATE else ctx.NEW, which)

        state_terms = {name: tuple((coef, operand(term)) for term, coef in update.state[name].items())
                       for name in update.accumulators}
        output_terms = tuple((coef, operand(term)) for term, coef in update.output.items())
        return ctx.UpdateRule(tuple(update.accumulators), state_terms, output_terms)

    def _missing_message(self, target: int, window: List[int], missing: List[int]) -> str:
        gone = ", ".join(f"{it} ({self.known.get(it, '?')})" for it in missing)
        last = self.history.last
        kept = f"; keeping the last published merge ({last.dirname})" if last else ""
        return (f"the merge at iteration {target} (window {_span(window)}) needs checkpoint(s) {gone}, which no "
                f"longer exist (deleted by the trainer's retention?), and no running state avoids them{kept}")


def _span(window: Sequence[int]) -> str:
    return f"{window[0]}..{window[-1]}, {len(window)} checkpoints" if len(window) > 1 else str(window[0])


def _committed_already(plan: WatchPlan) -> bool:
    """Killed after this very update committed (its manifest, no staging left)."""
    manifest = Manifest.read_if_present(plan.out)
    return manifest is not None and manifest.fingerprint == plan.fingerprint and \
        os.path.exists(os.path.join(plan.out, plan.output.commit_marker)) and \
        not os.path.exists(os.path.join(plan.out, STAGING))


class WatchUpdate(MergeRun):
    """The engine's steps for one publish, with the watcher's plan, arithmetic and state."""

    def __init__(self, options: MergeOptions, collective, planner: Optional[UpdatePlanner], target: int):
        super().__init__(options, collective)
        self.planner, self.target = planner, target

    def _plan_and_shares(self):
        # The coordinator goes on with the format that planned: what it parsed (a DCP .metadata)
        # is not parsed again to finalize.
        plan, self.snapshot, self.planning_format = self.planner.plan(self.target, self.collective.world_size)
        return [(plan if rank == 0 else plan.for_rank(), share) for rank, share in enumerate(plan.shares)]

    def _prepare(self, staging: Staging, plan: WatchPlan) -> None:
        ledger = self.planner.ledger
        pending = ledger.pending()
        published = {p.iteration for p in self.planner.history.published}
        if pending and pending["iteration"] != plan.target and pending["iteration"] not in published:
            # An update interrupted earlier, for a target no longer due (a newer checkpoint came):
            # its output and state were never published.
            ledger.discard(os.path.join(ledger.out, pending["dirname"]))
            ledger.discard(ledger.state_dir(pending["iteration"]))
        state_dir = plan.state_dir
        recorded_state = _read_text(os.path.join(state_dir, FINGERPRINT)) if state_dir else plan.fingerprint
        resume = _staged_fingerprint(staging) == plan.fingerprint and recorded_state == plan.fingerprint
        if not resume:
            # An abandoned attempt at this target (other inputs, other state): never published.
            ledger.discard(os.path.join(ledger.out, plan.dirname))
            if state_dir:
                ledger.discard(state_dir)
        ledger.set_pending(plan.target, plan.dirname)
        staging.prepare(plan.fingerprint, {}, resume)
        if state_dir:
            os.makedirs(state_dir, exist_ok=True)
            for name in os.listdir(state_dir):
                if ".tmp." in name:
                    os.remove(os.path.join(state_dir, name))
            if not resume:
                write_text_atomically(os.path.join(state_dir, FINGERPRINT), plan.fingerprint)

    def share_merger(self, fmt, plan: WatchPlan, share, staging: Staging, device) -> ShareMerger:
        if plan.rule is None:
            return super().share_merger(fmt, plan, share, staging, device)
        return IncrementalShareMerger(fmt, plan, share, staging, device, self.collective.rank,
                                      show_progress=self.collective.is_coordinator and not self.options.quiet)

    def manifest_sources(self, plan: WatchPlan) -> List[dict]:
        return [{"iteration": c.iteration, "path": c.path} for c in plan.window]

    def before_commit(self, fmt, plan: WatchPlan, staging: Staging, outcomes) -> None:
        if plan.rule is None:
            return
        details = [r.details["watch"] for o in outcomes for r in o.results if "watch" in r.details]
        keys = [key for d in details for key in d["state_keys"]]
        if plan.previous_state:
            expected = StateReader(plan.previous_state).entries
            left = sorted(set(expected) - set(keys))
            if left:
                raise ctx.RunningStateMismatch([f"{plan.checkpoints[-1].path}: lacks {key}, which the running state "
                                                f"{plan.previous_state} has" for key in left])
        ways = _model_weights_by_unit(outcomes)
        if plan.previous_state:
            _check_model_weights(ways, read_json(os.path.join(plan.previous_state, STATE_INFO)) or {})
        usable = not any(d["nonfinite_state"] for d in details)
        info = dict(plan.state_info, usable=usable, tensors=len(keys), bytes=state_bytes(plan.state_dir),
                    model_weights={relpath: way for relpath, (way, _) in ways.items()})
        write_json_atomically(os.path.join(plan.state_dir, STATE_INFO), info)


class IncrementalShareMerger(ShareMerger):
    """A rank's share, merged through the incremental context; each unit's new state is written
    (and closed) before the unit is marked done, so a resumed update trusts both or neither."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        plan: WatchPlan = self.plan
        self.previous = StateReader(plan.previous_state) if plan.previous_state else None

    def run(self):
        try:
            return super().run()
        finally:
            if self.previous is not None:
                self.previous.close()

    def completed(self, unit: WorkUnit):
        outcome = super().completed(unit)
        if outcome is not None and unit.action == Action.MERGE and \
                not os.path.isfile(state_file(self.plan.state_dir, unit.relpath)):
            return None
        return outcome

    def context_for(self, unit: WorkUnit, on_progress):
        if unit.action != Action.MERGE:
            return super().context_for(unit, on_progress)
        plan: WatchPlan = self.plan
        return ctx.IncrementalContext(
            weights=[0.0] * len(plan.checkpoints), device=self.device, optimizer_policy=plan.optimizer_policy,
            on_progress=on_progress, on_nonfinite=plan.on_nonfinite, tensor_filter=plan.tensor_filter, rule=plan.rule,
            fmt=self.fmt, unit=unit,
            previous=self.previous, writer=StateWriter(state_file(plan.state_dir, unit.relpath)))

    def unit_finished(self, unit, context, outcome):
        if not isinstance(context, ctx.IncrementalContext):
            return outcome
        return ctx.with_state_details(outcome, context, context.writer.close())


def _model_weights_by_unit(outcomes) -> Dict[str, Tuple[str, dict]]:
    """relpath -> (where its model weights came from, its details), for the units that say."""
    return {r.relpath: (r.details[MODEL_WEIGHTS_FROM], r.details) for o in outcomes for r in o.results
            if MODEL_WEIGHTS_FROM in r.details}


def _check_model_weights(ways: Dict[str, Tuple[str, dict]], previous_info: dict) -> None:
    """An update from a running state gives the merge of its window only where each unit takes
    its model weights as the state did, and the newest alone decided that (formats.masters
    ``by_older``: otherwise checkpoints this update does not read could decide otherwise).
    States of before the record are of model copies (the watcher took no masters then)."""
    recorded = previous_info.get("model_weights", {})
    problems = []
    for relpath, (way, details) in sorted(ways.items()):
        before = recorded.get(relpath, WEIGHTS_FROM_MODEL)
        if details.get(MODEL_WEIGHTS_BY_OLDER):
            problems.append(f"{relpath}: the {way}, because {details.get(MODEL_WEIGHTS_NOTE, 'of an older source')}: "
                            "the checkpoints of the whole window decide")
        elif way != before:
            problems.append(f"{relpath}: the running state follows the {before}, this update takes the {way}")
    if problems:
        raise ctx.RunningStateMismatch(problems)


def _staged_fingerprint(staging: Staging) -> Optional[str]:
    try:
        with open(os.path.join(staging.state_dir, "fingerprint.json")) as f:
            return json.load(f).get("fingerprint")
    except (OSError, ValueError):
        return None


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None
