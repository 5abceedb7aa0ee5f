"""The app's data folders and the rule that nothing typed into the UI reaches outside them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dcustom.errors import DcustomError


@dataclass(frozen=True)
class AppPaths:
    """Everything the app reads or writes lives under `root`."""

    root: Path

    @classmethod
    def create(cls, data_dir: str | Path) -> "AppPaths":
        paths = cls(Path(data_dir).expanduser().resolve())
        for folder in (paths.outputs, paths.uploads, paths.adapters, paths.runs, paths.models, paths.style):
            folder.mkdir(parents=True, exist_ok=True)
        return paths

    @property
    def outputs(self) -> Path:  # generated images
        return self.root / "outputs"

    @property
    def style(self) -> Path:  # stylized images
        return self.root / "style"

    @property
    def uploads(self) -> Path:  # validated copies of uploaded images
        return self.root / "uploads"

    @property
    def adapters(self) -> Path:  # the adapter library: one folder per adapter
        return self.root / "adapters"

    @property
    def runs(self) -> Path:  # training run folders
        return self.root / "runs"

    @property
    def models(self) -> Path:  # local base models a user may name by path
        return self.root / "models"

    def confine(self, typed: str | Path, what: str = "path") -> Path:
        """Resolve a path typed into the UI; refuse it unless it stays inside the data folder.

        Relative paths are taken relative to the data folder; symlinks are resolved first, so a
        link pointing outside is refused too.
        """
        raw = str(typed).strip()
        if not raw:
            raise DcustomError(f"{what}: is empty; give a path inside the app's data folder {str(self.root)!r}.")
        candidate = Path(raw).expanduser()
        if not candidate.is_absolute():
            candidate = self.root / candidate
        resolved = candidate.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise DcustomError(f"{what}: {raw!r} is outside the app's data folder {str(self.root)!r}; "
                               "only paths inside it are accepted.")
        return resolved


def safe_name(text: str, what: str = "name") -> str:
    """A single folder/file name: letters, digits, '-', '_' and '.', no leading dot."""
    name = str(text).strip()
    if not name or name.startswith(".") or any(not (c.isalnum() or c in "-_.") for c in name) or len(name) > 80:
        raise DcustomError(f"{what}: {text!r} is not a valid name; use 1-80 letters, digits, '-', '_' or '.', "
                           "not starting with a dot.")
    return name
