"""Small shared helpers (machine line, commit id) for eval and bench."""

from .machine import git_commit, machine_info

__all__ = ["git_commit", "machine_info"]
