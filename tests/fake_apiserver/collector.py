"""The garbage collector: what kube-controller-manager would do for the fake.

Mixed into :class:`~.store.Store` and run by a background thread of
``FakeApiServer`` every ``gc_interval`` seconds (:meth:`gc_pass`).  It is
deliberately *asynchronous*, like the real one, so controller code that
assumes a cascading delete is synchronous fails in tests too:

* dependents whose ``ownerReferences`` uids are *all* gone are deleted once
  the owner has been absent for ``gc_delay`` seconds (their own finalizers
  are honoured); references to some, but not all, gone owners are removed;
* an owner deleted with ``propagationPolicy=Orphan`` (finalizer ``orphan``)
  has the references to it stripped from its dependents, then the finalizer
  removed;
* an owner deleted with ``Foreground`` (finalizer ``foregroundDeletion``)
  has its dependents deleted first, and the finalizer is removed once they
  are all gone (``blockOwnerDeletion`` is not distinguished);
* objects in a namespace that no longer exists are deleted.

Owners are matched by uid only, as the real collector does after it has
verified the reference.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .schema import ResourceType


def meta(obj: dict) -> dict:
    return obj.get("metadata") or {}


class GarbageCollectorMixin:
    """Needs the Store's ``cond``, ``objects``, ``types``, ``uids``, ``absent_since``,
    ``gc_delay``, ``_commit``, ``_remove``, ``_delete_locked``, ``_namespace_exists``
    and ``get``."""

    def _all_objects(self) -> list[tuple[ResourceType, dict]]:
        return [(self.types[key], obj) for key, objs in self.objects.items()
                if key in self.types for obj in objs.values()]

    def _is_current(self, rt: ResourceType, obj: dict) -> bool:
        """False when ``obj`` (from an earlier snapshot) has since changed or gone."""
        md = meta(obj)
        return self.objects.get(rt.key, {}).get((md.get("namespace", ""), md["name"])) is obj

    def _set_finalizers(self, rt: ResourceType, obj: dict, finalizers: list[str]) -> None:
        new_md = {**meta(obj), "finalizers": finalizers}
        if not finalizers:
            new_md.pop("finalizers")
        new = {**obj, "metadata": new_md}
        if meta(obj).get("deletionTimestamp") and not finalizers:
            self._remove(rt, new)
        else:
            self._commit(rt, new, obj)

    def _strip_owner(self, rt: ResourceType, obj: dict, uids: set[str]) -> None:
        refs = [r for r in meta(obj).get("ownerReferences") or [] if r.get("uid") not in uids]
        new_md = {**meta(obj), "ownerReferences": refs}
        if not refs:
            new_md.pop("ownerReferences")
        self._commit(rt, {**obj, "metadata": new_md}, obj)

    def gc_pass(self, now: float | None = None) -> int:
        """One sweep of what kube-controller-manager's garbage collector and
        namespace controller would do; returns how many objects it changed."""
        now = time.monotonic() if now is None else now
        changed = 0
        with self.cond:
            # 1. content of deleted namespaces
            for rt, obj in self._all_objects():
                ns = meta(obj).get("namespace")
                if self._is_current(rt, obj) and rt.namespaced and ns and not self._namespace_exists(ns) \
                        and not meta(obj).get("deletionTimestamp"):
                    self._delete_locked(rt, obj, None)
                    changed += 1
            # 2. owners being deleted with Orphan / Foreground propagation
            for rt, owner in self._all_objects():
                if not self._is_current(rt, owner):
                    continue
                md = meta(owner)
                fins = md.get("finalizers") or []
                if not md.get("deletionTimestamp") or not (
                        "orphan" in fins or "foregroundDeletion" in fins):
                    continue
                uid = md["uid"]
                deps = [(drt, d) for drt, d in self._all_objects()
                        if any(r.get("uid") == uid for r in meta(d).get("ownerReferences") or [])]
                if "orphan" in fins:
                    for drt, dep in deps:
                        if self._is_current(drt, dep):
                            self._strip_owner(drt, dep, {uid})
                    self._set_finalizers(rt, self.get(rt, md.get("namespace", ""), md["name"]),
                                         [f for f in fins if f != "orphan"])
                    changed += 1
                    continue
                for drt, dep in deps:
                    if self._is_current(drt, dep) and not meta(dep).get("deletionTimestamp"):
                        self._delete_locked(drt, dep, None)
                        changed += 1
                if not any(meta(d)["uid"] in self.uids for _, d in deps):
                    self._set_finalizers(rt, self.get(rt, md.get("namespace", ""), md["name"]),
                                         [f for f in fins if f != "foregroundDeletion"])
                    changed += 1
            # 3. dependents whose owners are gone (after gc_delay)
            referenced: set[str] = set()
            for rt, obj in self._all_objects():
                refs = meta(obj).get("ownerReferences") or []
                referenced.update(r.get("uid") for r in refs)
                if not refs or meta(obj).get("deletionTimestamp") or not self._is_current(rt, obj):
                    continue
                absent = {r.get("uid") for r in refs if r.get("uid") not in self.uids}
                ready = {u for u in absent if now - self.absent_since.setdefault(u, now)
                         >= self.gc_delay}
                if not ready:
                    continue
                if all(r.get("uid") in ready for r in refs):
                    self._delete_locked(rt, obj, None)
                else:
                    self._strip_owner(rt, obj, ready)
                changed += 1
            for uid in [u for u, t in self.absent_since.items()
                        if u not in referenced and now - t > 60]:
                del self.absent_since[uid]
        return changed
