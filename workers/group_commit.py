"""The worker's group committer: genq.group_commit, shared with the submit path (the worker's
modules import it from here)."""

from genq.group_commit import BatchedWrite, GroupCommitter

__all__ = ["BatchedWrite", "GroupCommitter"]
