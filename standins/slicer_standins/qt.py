"""Stand-in for PythonQt's ``qt`` module: only what the CT-SAM3D code and slicer.util use.

PythonQt semantics kept: Qt properties read and assigned as attributes (assigning a notifying property
emits its signal), signals reached both as ``obj.clicked.connect(fn)`` and ``obj.connect("clicked()", fn)``,
``blockSignals`` returning the previous state. Timers fire at their interval, and only from the event
loop (``processEvents()``, ``runEventLoop()``), which holds the GIL between Python calls as Slicer's does.
"""

import ctypes
import time
from typing import Callable, List


class Signal:
    def __init__(self, owner: "QObject") -> None:
        self._owner = owner
        self._slots: List[Callable] = []

    def connect(self, slot: Callable) -> None:
        self._slots.append(slot)

    def disconnect(self, slot: Callable = None) -> None:
        self._slots = [] if slot is None else [s for s in self._slots if s != slot]

    def slotCount(self) -> int:
        """How many slots are connected (QObject::receivers(signal), test helper)."""
        return len(self._slots)

    def emit(self, *args) -> None:
        if self._owner._signalsBlocked:
            return
        for slot in list(self._slots):
            slot(*args)


class QObject:
    SIGNALS = ()

    def __init__(self, *args, **kwargs) -> None:
        self._signalsBlocked = False
        for cls in type(self).__mro__:
            for name in getattr(cls, "SIGNALS", ()):
                if name not in self.__dict__:
                    self.__dict__[name] = Signal(self)

    def connect(self, signature: str, slot: Callable) -> bool:
        getattr(self, signature.split("(")[0]).connect(slot)
        return True

    def disconnect(self, signature: str, slot: Callable = None) -> None:
        getattr(self, signature.split("(")[0]).disconnect(slot)

    def blockSignals(self, block: bool) -> bool:
        previous = self._signalsBlocked
        self._signalsBlocked = bool(block)
        return previous


class Qt:
    WaitCursor = 3
    TextSelectableByMouse = 1
    AlignLeft = 1


class QPoint:
    def __init__(self, x: int = 0, y: int = 0) -> None:
        self._x, self._y = int(x), int(y)

    def x(self) -> int:
        return self._x

    def y(self) -> int:
        return self._y


class QVector3D:
    def __init__(self, x: float = 0.0, y: float = 0.0, z: float = 0.0) -> None:
        self._v = (float(x), float(y), float(z))

    def x(self) -> float:
        return self._v[0]

    def y(self) -> float:
        return self._v[1]

    def z(self) -> float:
        return self._v[2]


class QIcon:
    def __init__(self, path: str = "") -> None:
        self.path = path

    def isNull(self) -> bool:
        return not self.path


class QCursor:
    def __init__(self, *args) -> None:
        self.args = args


class QMessageBox:
    Ok = 0x400
    Cancel = 0x400000
    Yes = 0x4000
    No = 0x10000
    Retry = 0x80000
    Close = 0x200000
    Critical = 3
    Question = 4
    Warning = 2
    Information = 1


class QElapsedTimer:
    def start(self) -> None:
        self._started = time.monotonic()

    def elapsed(self) -> int:
        return int((time.monotonic() - self._started) * 1000)


# ------------------------------------------------------------------ widgets
class QWidget(QObject):
    def __init__(self, parent=None) -> None:
        super().__init__()
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self.objectName = ""
        self._layout = None

    def layout(self):
        return self._layout

    def setLayout(self, layout) -> None:
        self._layout = layout

    def setEnabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def setVisible(self, visible: bool) -> None:
        self.visible = bool(visible)

    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False

    def className(self) -> str:
        return type(self).__name__


class QFrame(QWidget):
    pass


class QLabel(QWidget):
    def __init__(self, text: str = "", parent=None) -> None:
        super().__init__(parent)
        self.text = text
        self.wordWrap = False
        self.textInteractionFlags = 0


class QAbstractButton(QWidget):
    SIGNALS = ("clicked", "toggled", "pressed", "released")

    def __init__(self, text: str = "", parent=None) -> None:
        super().__init__(parent)
        self.text = text
        self.checkable = False
        self._checked = False

    @property
    def checked(self) -> bool:
        return self._checked

    @checked.setter
    def checked(self, value: bool) -> None:
        value = bool(value)
        if self.checkable and value != self._checked:
            self._checked = value
            self.toggled.emit(value)

    def setChecked(self, value: bool) -> None:
        self.checked = value

    def isChecked(self) -> bool:
        return self._checked

    def click(self) -> None:
        """What a user's click does: ignored when disabled, toggles a checkable button."""
        if not self.enabled:
            return
        if self.checkable:
            self.checked = not self._checked
        self.clicked.emit()


class QPushButton(QAbstractButton):
    pass


class QCheckBox(QAbstractButton):
    def __init__(self, text: str = "", parent=None) -> None:
        super().__init__(text, parent)
        self.checkable = True


class QSpinBox(QWidget):
    """Qt clamps the value to [minimum, maximum] and emits valueChanged(int) only on a change."""

    SIGNALS = ("valueChanged",)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.minimum = 0
        self.maximum = 99
        self._value = 0

    @property
    def value(self) -> int:
        return self._value

    @value.setter
    def value(self, value: int) -> None:
        value = min(max(int(value), self.minimum), self.maximum)
        if value != self._value:
            self._value = value
            self.valueChanged.emit(value)


class QLineEdit(QWidget):
    """As Qt: assigning ``text`` emits textChanged only; editingFinished comes from the user pressing
    Return or leaving the field (``finishEditing`` here), never from a programmatic change."""

    SIGNALS = ("textChanged", "editingFinished")
    Normal, NoEcho, Password = 0, 1, 2

    def __init__(self, text: str = "", parent=None) -> None:
        super().__init__(parent)
        self._text = str(text)
        self.placeholderText = ""
        self.echoMode = self.Normal

    @property
    def text(self) -> str:
        return self._text

    @text.setter
    def text(self, text: str) -> None:
        if str(text) != self._text:
            self._text = str(text)
            self.textChanged.emit(self._text)

    def finishEditing(self) -> None:
        """What the user's Return (or moving to another field) does."""
        if self.enabled:
            self.editingFinished.emit()


class QComboBox(QWidget):
    SIGNALS = ("currentTextChanged", "currentIndexChanged")

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._items: List[str] = []
        self._index = -1

    def addItems(self, items) -> None:
        for item in items:
            self.addItem(item)

    def addItem(self, text: str) -> None:
        self._items.append(str(text))
        if self._index < 0:
            self._setIndex(0)

    def _setIndex(self, index: int) -> None:
        if index != self._index:
            self._index = index
            self.currentIndexChanged.emit(index)
            self.currentTextChanged.emit(self.currentText)

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def currentText(self) -> str:
        return self._items[self._index] if self._index >= 0 else ""

    @currentText.setter
    def currentText(self, text: str) -> None:
        if text in self._items:
            self._setIndex(self._items.index(text))

    @property
    def currentIndex(self) -> int:
        return self._index

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:
        self._setIndex(index)

    def itemText(self, index: int) -> str:
        return self._items[index]


class QProgressBar(QWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.value = 0
        self.minimum = 0
        self.maximum = 100
        self.format = "%p%"


class QLayout(QObject):
    def __init__(self, parent=None) -> None:
        super().__init__()
        self.items: List[object] = []
        if isinstance(parent, QWidget):
            parent.setLayout(self)

    def addWidget(self, widget, *args) -> None:
        self.items.append(widget)

    def addLayout(self, layout, *args) -> None:
        self.items.append(layout)

    def addStretch(self, *args) -> None:
        self.items.append("stretch")

    def widgets(self) -> List[QWidget]:
        """Every widget in this layout and its nested layouts (test helper)."""
        found = []
        for item in self.items:
            if isinstance(item, QWidget):
                found.append(item)
                if item.layout() is not None:
                    found.extend(item.layout().widgets())
            elif isinstance(item, QLayout):
                found.extend(item.widgets())
        return found


class QHBoxLayout(QLayout):
    pass


class QVBoxLayout(QLayout):
    pass


class QFormLayout(QLayout):
    def addRow(self, *args) -> None:
        for item in args:
            if isinstance(item, (QWidget, QLayout)):
                self.items.append(item)
            else:
                self.items.append(QLabel(str(item)))


# ------------------------------------------------------------------- timers
# Slicer embeds Python through PythonQt without thread support (PythonQt::setEnableThreadSupport is
# never called; commontk/PythonQt src/PythonQt.h, Slicer Base/QTCore/qSlicerCorePythonManager.cxx),
# so the main thread holds the GIL all the time Qt's event loop runs C++ code: while it waits for the
# next event, while it dispatches and renders. A Python worker thread then runs only while the main
# thread runs Python that gives the GIL up (a blocking wait, or the interpreter's switch interval).
# The loop below does the same: between Python calls it waits through usleep called by ctypes.PyDLL,
# which keeps the GIL, exactly as C++ code under PythonQt does.
_usleepHoldingGil = ctypes.PyDLL(None).usleep
_usleepHoldingGil.argtypes = [ctypes.c_uint]

EVENT_DISPATCH_MSEC = 2
"""C++ work of one pass of the event loop (dispatch, layout, rendering), done with the GIL held."""

IDLE_WAIT_MSEC = 10
"""Longest GIL-holding wait of the loop before it looks at the test's condition again."""

pumpTimes: List[float] = []
"""time.monotonic() of every processEvents() call (tests read the gaps while a job runs)."""

_activeTimers: List["QTimer"] = []


def holdGil(seconds: float) -> None:
    """Let ``seconds`` pass in C++ with the GIL held, as Qt's event loop does under PythonQt."""
    if seconds > 0:
        _usleepHoldingGil(int(seconds * 1e6))


class QTimer(QObject):
    """Fires ``timeout`` once ``interval`` ms have passed since start (then again every ``interval``
    unless single-shot), and only from the event loop: processEvents() or runEventLoop()."""

    SIGNALS = ("timeout",)

    def __init__(self, parent=None) -> None:
        super().__init__()
        self.interval = 0
        self._singleShot = False
        self._active = False
        self._due = 0.0

    def setSingleShot(self, singleShot: bool) -> None:
        self._singleShot = bool(singleShot)

    def isSingleShot(self) -> bool:
        return self._singleShot

    def setInterval(self, msec: int) -> None:
        self.interval = int(msec)

    def start(self, msec: int = None) -> None:
        if msec is not None:
            self.interval = int(msec)
        self._active = True
        self._due = time.monotonic() + self.interval / 1000.0
        if self not in _activeTimers:
            _activeTimers.append(self)

    def stop(self) -> None:
        self._active = False
        if self in _activeTimers:
            _activeTimers.remove(self)

    def isActive(self) -> bool:
        return self._active

    @property
    def remainingTime(self) -> int:
        return max(0, int((self._due - time.monotonic()) * 1000)) if self._active else -1

    @staticmethod
    def singleShot(msec: int, slot: Callable) -> None:
        timer = QTimer()
        timer.setSingleShot(True)
        timer.timeout.connect(slot)
        timer.start(msec)

    def _fireIfDue(self, now: float) -> None:
        if not self._active or now < self._due:
            return
        if self._singleShot:
            self.stop()
        else:
            self._due = now + self.interval / 1000.0
        self.timeout.emit()


def activeTimers() -> List[QTimer]:
    return list(_activeTimers)


def _fireDueTimers() -> None:
    now = time.monotonic()
    for timer in sorted(_activeTimers, key=lambda t: t._due):
        timer._fireIfDue(now)


def processEvents() -> None:
    """QCoreApplication::processEvents: one pass of the loop (GIL held), firing the timers that are due."""
    pumpTimes.append(time.monotonic())
    holdGil(EVENT_DISPATCH_MSEC / 1000.0)
    _fireDueTimers()


def runEventLoop(condition: Callable[[], bool], timeoutSeconds: float = 60.0) -> None:
    """Qt's event loop as it runs in Slicer between Python calls, until ``condition()`` holds: due
    timers fire, and the time between them passes in C++ with the GIL held."""
    deadline = time.monotonic() + timeoutSeconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeoutSeconds} s of the event loop")
        _fireDueTimers()
        nextDue = min((timer._due for timer in _activeTimers), default=float("inf"))
        wait = min(IDLE_WAIT_MSEC / 1000.0, max(0.0, nextDue - time.monotonic()))
        holdGil(max(wait, EVENT_DISPATCH_MSEC / 1000.0))


def stopAllTimers() -> None:
    for timer in list(_activeTimers):
        timer.stop()
