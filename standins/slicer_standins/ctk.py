"""Stand-in for PythonQt's ``ctk`` module: the two CTK widgets the module panel uses."""

from .qt import QWidget


class ctkCollapsibleButton(QWidget):  # noqa: N801  (CTK's name)
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.text = ""
        self.collapsed = False


class ctkPathLineEdit(QWidget):  # noqa: N801  (CTK's name)
    SIGNALS = ("currentPathChanged",)
    Files = 0x2
    Dirs = 0x1

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.filters = self.Files
        self.nameFilters = []
        self._path = ""

    @property
    def currentPath(self) -> str:
        return self._path

    @currentPath.setter
    def currentPath(self, path: str) -> None:
        path = str(path or "")
        if path != self._path:
            self._path = path
            self.currentPathChanged.emit(path)
