"""What the placement policies see of the simulated instances: one `InstanceView` per
instance, kept in a list per role that is handed to the policies as it is (a policy only
reads its candidates), so placing a request never copies the cluster's state."""

from __future__ import annotations

from collections.abc import Iterable

from shuffleinfer.scheduler.policies.placement import InstanceView


class ViewBoard:
    """Views by instance, and the candidate list of each role."""

    def __init__(self) -> None:
        self.views: dict[str, InstanceView] = {}
        self._lists: dict[str, list[InstanceView]] = {}
        self._where: dict[str, tuple[str, int]] = {}
        self.dirty: set[str] = set()
        """Instances whose state changed since their view was last refreshed."""

    def arrange(self, roles: dict[str, Iterable[str]]) -> None:
        """Candidate lists for each role, in the given order (after a role change)."""
        self._lists, self._where = {}, {}
        for role, ids in roles.items():
            self._lists[role] = [self.views[i] for i in ids]
            for position, i in enumerate(ids):
                self._where[i] = (role, position)

    def candidates(self, role: str) -> list[InstanceView]:
        return self._lists.get(role, [])

    def __getitem__(self, instance_id: str) -> InstanceView:
        return self.views[instance_id]

    def __setitem__(self, instance_id: str, view: InstanceView) -> None:
        assert view.instance_id == instance_id
        self.update((view,))

    def update(self, fresh: Iterable[InstanceView]) -> None:
        """Set many views at once (a monitor tick's)."""
        views, lists, where = self.views, self._lists, self._where
        for view in fresh:
            i = view.instance_id
            views[i] = view
            place = where.get(i)
            if place is not None:
                lists[place[0]][place[1]] = view
