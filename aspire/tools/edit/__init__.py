"""Step 4's editing (see editor.py): the Editor, its requests, and where controls go."""

from aspire.tools.edit.editor import Editor, as_tool
from aspire.tools.edit.masks import find_control
from aspire.tools.edit.records import BackgroundRequest, Donor, PasteRequest, RemoveRequest, Skip

__all__ = ["BackgroundRequest", "Donor", "Editor", "PasteRequest", "RemoveRequest", "Skip", "as_tool", "find_control"]
