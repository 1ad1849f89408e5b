"""Where the packs stand: members, slots, Jobs. A cache of the resources, kept by the watches.

Each member's status names its pack (status.pack), so the resources hold the whole truth and a
restarted operator rebuilds this book from them: kopf runs index handlers for every object of its
initial listings before any other handler (pack_handlers.py), so the book is complete before the
first decision. The operator's own writes go in at once (`put_member`, `close`): the watch
delivers them a moment later, and decisions in between must not see a slot as free twice.

Watch events may arrive late. What they add is therefore merged one way only: a member that
finished stays finished, and no event moves a member back into a pack that has ended.

Decisions that change a pack hold `lock(namespace)`: packs never span namespaces, so one
namespace's decisions never wait for another's.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any, Callable, Optional

from . import lifecycle, names
from .packing import Member, PackView

Key = tuple[str, str]  # (namespace, name)


class PackBook:
    def __init__(self) -> None:
        self._guard = threading.RLock()
        self._locks: dict[str, threading.RLock] = {}
        self._reset()

    def _reset(self) -> None:
        self._packs: dict[Key, PackView] = {}
        self._where: dict[Key, str] = {}  # (namespace, member) -> pack
        self._objects: dict[tuple[str, str, str], dict] = {}  # (namespace, pack, kind) -> latest copy
        self._jobs: dict[Key, dict] = {}  # (namespace, pack) -> the Job as last seen
        self._timers: dict[Key, threading.Timer] = {}
        self._founders: dict[Key, tuple[Any, str]] = {}  # (namespace, pack) -> (a member's parsed job, its name)

    def clear(self) -> None:
        """Forget everything (an operator start: the watches refill it)."""
        with self._guard:
            for timer in self._timers.values():
                timer.cancel()
            self._reset()

    def lock(self, namespace: str) -> threading.RLock:
        with self._guard:
            return self._locks.setdefault(namespace, threading.RLock())

    # ---- reading -----------------------------------------------------------------------------------

    def packs(self, namespace: str) -> list[PackView]:
        with self._guard:
            return [self._copy(view) for (ns, _), view in self._packs.items() if ns == namespace]

    def pack(self, namespace: str, pack: str) -> Optional[PackView]:
        with self._guard:
            view = self._packs.get((namespace, pack))
            return self._copy(view) if view is not None else None

    def pack_of(self, namespace: str, member: str) -> Optional[str]:
        with self._guard:
            return self._where.get((namespace, member))

    def job(self, namespace: str, pack: str) -> Optional[dict]:
        with self._guard:
            return self._jobs.get((namespace, pack))

    def counts(self) -> tuple[int, int]:
        """(packs whose Job runs or is about to, members holding a slot in them)."""
        with self._guard:
            live = [v for v in self._packs.values() if not v.job_finished and not v.closed and v.active]
            return len(live), sum(len(v.active) for v in live)

    @staticmethod
    def _copy(view: PackView) -> PackView:
        return replace(view, members=dict(view.members))

    # ---- the watches -------------------------------------------------------------------------------

    def observe_member(self, body: dict) -> None:
        """A PersonalizationJob as a watch event showed it."""
        meta = body.get("metadata") or {}
        st = body.get("status") or {}
        pack = (st.get("pack") or {}).get("job")
        namespace, name = meta.get("namespace", ""), meta.get("name", "")
        if not pack:
            return
        with self._guard:
            view = self._packs.setdefault((namespace, pack), PackView(pack))
            current = self._where.get((namespace, name))
            if current and current != pack:
                if view.closed or view.job_finished:
                    return  # an old event: the member has moved on from an ended pack
                self._drop(namespace, name)
            member = Member(name=name, uid=meta.get("uid", ""), slot=int(st["pack"].get("slot", 0)),
                            active=st.get("phase") not in lifecycle.TERMINAL,
                            output_uri=((body.get("spec") or {}).get("output") or {}).get("uri"))
            before = view.members.get(name)
            if before is not None and before.uid == member.uid and not before.active:
                member = replace(member, active=False)  # finished stays finished
            view.members[name] = member
            self._where[(namespace, name)] = pack

    def forget_member(self, namespace: str, name: str) -> Optional[str]:
        """The member is gone (deleted) or released; returns the pack it was in."""
        with self._guard:
            return self._drop(namespace, name)

    def _drop(self, namespace: str, name: str) -> Optional[str]:
        pack = self._where.pop((namespace, name), None)
        view = self._packs.get((namespace, pack)) if pack else None
        if view is not None:
            view.members.pop(name, None)
        return pack

    def observe_job(self, body: dict, deleted: bool = False) -> Optional[str]:
        """A pack's Job as a watch event showed it; returns the pack's name."""
        meta = body.get("metadata") or {}
        pack = (meta.get("labels") or {}).get(names.LABEL_PACK)
        if not pack:
            return None
        namespace = meta.get("namespace", "")
        with self._guard:
            view = self._packs.setdefault((namespace, pack), PackView(pack))
            view.job_created = True
            ended = deleted or lifecycle.job_condition(body, "Complete") or lifecycle.job_condition(body, "Failed")
            view.job_finished = view.job_finished or bool(ended)
            if deleted:
                self._jobs.pop((namespace, pack), None)
            else:
                self._jobs[(namespace, pack)] = body
        return pack

    # ---- the operator's own decisions --------------------------------------------------------------

    def put_member(self, namespace: str, pack: str, member: Member) -> None:
        with self._guard:
            if self._where.get((namespace, member.name)) not in (None, pack):
                self._drop(namespace, member.name)
            self._packs.setdefault((namespace, pack), PackView(pack)).members[member.name] = member
            self._where[(namespace, member.name)] = pack

    def finish_member(self, namespace: str, name: str) -> None:
        with self._guard:
            pack = self._where.get((namespace, name))
            view = self._packs.get((namespace, pack)) if pack else None
            if view is not None and name in view.members:
                view.members[name] = replace(view.members[name], active=False)

    def job_created(self, namespace: str, pack: str, body: Optional[dict] = None) -> None:
        with self._guard:
            self._packs.setdefault((namespace, pack), PackView(pack)).job_created = True
            if body is not None:
                self._jobs.setdefault((namespace, pack), body)

    def close(self, namespace: str, pack: str) -> None:
        """No member may join any more (its Job ended, or the operator deleted it)."""
        with self._guard:
            self._packs.setdefault((namespace, pack), PackView(pack)).closed = True
            timer = self._timers.pop((namespace, pack), None)
            if timer is not None:
                timer.cancel()

    def founder(self, namespace: str, pack: str) -> Optional[tuple[Any, str]]:
        """A member's parsed job and name: what the pack's pod is built from."""
        with self._guard:
            return self._founders.get((namespace, pack))

    def set_founder(self, namespace: str, pack: str, parsed: Any, name: str) -> None:
        with self._guard:
            self._founders.setdefault((namespace, pack), (parsed, name))

    # ---- copies of the pack's objects (the operator's own writes) ----------------------------------

    def remember(self, namespace: str, pack: str, obj: Optional[dict]) -> None:
        if obj:
            with self._guard:
                self._objects[(namespace, pack, obj["kind"])] = obj

    def forget_object(self, namespace: str, pack: str, kind: str) -> None:
        with self._guard:
            self._objects.pop((namespace, pack, kind), None)

    def recall(self, namespace: str, pack: str, kind: str) -> Optional[dict]:
        with self._guard:
            return self._objects.get((namespace, pack, kind))

    # ---- a pack's Job starts when it is full or its collecting time is over ------------------------

    def schedule(self, namespace: str, pack: str, delay: float, start: Callable[[], Any]) -> None:
        with self._guard:
            if (namespace, pack) in self._timers:
                return
            timer = threading.Timer(max(delay, 0.0), start)
            timer.daemon = True
            self._timers[(namespace, pack)] = timer
        timer.start()

    def unschedule(self, namespace: str, pack: str) -> None:
        with self._guard:
            timer = self._timers.pop((namespace, pack), None)
        if timer is not None:
            timer.cancel()


BOOK = PackBook()
